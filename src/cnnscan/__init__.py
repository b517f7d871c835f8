"""cnnscan: a CT scan for convolutional image classifiers.

import cnnscan
model = cnnscan.load_model()                       # bundled EfficientNet-Lite0
image = cnnscan.load_image("sample:chelsea")
attr = cnnscan.explain(model, image, "integrated_gradients", targets="top5")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Each public name and the module that defines it. Modules load on first use, so that
# `import cnnscan` (and `cnnscan --help`) does not pay for torch until something needs it.
_HOMES = {
    "explain": "api",
    "explain_many": "api",
    "predict": "api",
    "Attribution": "attribution",
    "Audit": "spray",
    "audit": "spray",
    "AuditError": "errors",
    "Concepts": "concept",
    "concepts": "concept",
    "Picture": "display",
    "Predictions": "display",
    "show_feature_maps": "display",
    "show_filters": "display",
    "CnnscanError": "errors",
    "ImageError": "errors",
    "LayerError": "errors",
    "MethodError": "errors",
    "MetricError": "errors",
    "ModelError": "errors",
    "TargetError": "errors",
    "load_image": "images",
    "sample_image": "images",
    "conv_layers": "learned",
    "feature_maps": "learned",
    "filters": "learned",
    "top_channels": "learned",
    "MethodInfo": "methods",
    "get_method": "methods",
    "list_methods": "methods",
    "evaluate": "metrics",
    "evaluate_many": "metrics",
    "Model": "models",
    "list_models": "models",
    "load_model": "models",
    "Preprocessing": "models.preprocessing",
    "ReceptiveField": "receptive",
    "receptive_fields": "receptive",
    "Scan": "scan",
    "Synthesis": "synthesis",
    "class_image": "synthesis",
    "deepdream": "synthesis",
    "invert": "synthesis",
    "synthesize": "synthesis",
}
_SUBPACKAGES = {"batch"}

if TYPE_CHECKING:  # what static tools (type checkers, the API docs) see
    from cnnscan import batch
    from cnnscan.api import explain, explain_many, predict
    from cnnscan.attribution import Attribution
    from cnnscan.concept import Concepts, concepts
    from cnnscan.display import Picture, Predictions, show_feature_maps, show_filters
    from cnnscan.errors import (
        AuditError,
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
    from cnnscan.spray import Audit, audit
    from cnnscan.synthesis import Synthesis, class_image, deepdream, invert, synthesize


def __getattr__(name: str) -> Any:
    """Load a public name's module on first use (see `_HOMES`)."""
    if name in _HOMES:
        value = getattr(importlib.import_module(f"cnnscan.{_HOMES[name]}"), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"cnnscan.{name}")
    else:
        raise AttributeError(f"module 'cnnscan' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "Attribution",
    "Audit",
    "AuditError",
    "CnnscanError",
    "Concepts",
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
    "audit",
    "batch",
    "class_image",
    "concepts",
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
