"""cnnscan: a CT scan for convolutional image classifiers.

import cnnscan
model = cnnscan.load_model()                       # bundled EfficientNet-Lite0
image = cnnscan.load_image("sample:chelsea")
attr = cnnscan.explain(model, image, "integrated_gradients", targets="top5")
"""

from cnnscan import batch
from cnnscan.api import explain, explain_many, predict
from cnnscan.attribution import Attribution
from cnnscan.display import Picture, Predictions, show_feature_maps, show_filters
from cnnscan.errors import (
    CnnscanError,
    ImageError,
    LayerError,
    MethodError,
    MetricError,
    ModelError,
    TargetError,
)
from cnnscan.images import load_image, sample_image
from cnnscan.learned import conv_layers, feature_maps, filters, top_channels
from cnnscan.methods import MethodInfo, get_method, list_methods
from cnnscan.metrics import evaluate, evaluate_many
from cnnscan.models import Model, list_models, load_model
from cnnscan.models.preprocessing import Preprocessing
from cnnscan.receptive import ReceptiveField, receptive_fields
from cnnscan.scan import Scan
from cnnscan.synthesis import Synthesis, class_image, deepdream, invert, synthesize

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
    "Picture",
    "Predictions",
    "Preprocessing",
    "ReceptiveField",
    "Scan",
    "Synthesis",
    "TargetError",
    "batch",
    "class_image",
    "conv_layers",
    "deepdream",
    "evaluate",
    "evaluate_many",
    "explain",
    "explain_many",
    "feature_maps",
    "filters",
    "get_method",
    "invert",
    "list_methods",
    "list_models",
    "load_image",
    "load_model",
    "predict",
    "receptive_fields",
    "sample_image",
    "show_feature_maps",
    "show_filters",
    "synthesize",
    "top_channels",
]
