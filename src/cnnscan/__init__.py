"""cnnscan: a CT scan for convolutional image classifiers.

import cnnscan
model = cnnscan.load_model()                       # bundled EfficientNet-Lite0
image = cnnscan.load_image("sample:chelsea")
attr = cnnscan.explain(model, image, "integrated_gradients", targets="top5")
"""

from cnnscan.attribution import Attribution
from cnnscan.errors import (
    CnnscanError,
    ImageError,
    LayerError,
    MethodError,
    MetricError,
    ModelError,
    TargetError,
)
from cnnscan.explain import explain, explain_many, predict
from cnnscan.images import load_image, sample_image
from cnnscan.methods import MethodInfo, get_method, list_methods
from cnnscan.metrics import evaluate, evaluate_many
from cnnscan.models import Model, load_model
from cnnscan.preprocessing import Preprocessing
from cnnscan.scan import Scan

__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "CnnscanError",
    "ImageError",
    "LayerError",
    "MethodError",
    "MethodInfo",
    "MetricError",
    "Model",
    "ModelError",
    "Preprocessing",
    "Scan",
    "TargetError",
    "evaluate",
    "evaluate_many",
    "explain",
    "explain_many",
    "get_method",
    "list_methods",
    "load_image",
    "load_model",
    "predict",
    "sample_image",
]
