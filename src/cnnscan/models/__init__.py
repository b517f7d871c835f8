"""Models: `load_model` gives a `Model` (a classifier module, its preprocessing and labels)
by name (torchvision, timm, Keras-applications names), from a file (state dict,
safetensors, ONNX, Keras, a pickle with consent) or around any `nn.Module`."""

from cnnscan.models.bundled import DEFAULT_MODEL
from cnnscan.models.loading import ModelLike, as_model, load_model
from cnnscan.models.model import Model
from cnnscan.models.preprocessing import Preprocessing
from cnnscan.models.zoo import list_models

__all__ = [
    "DEFAULT_MODEL",
    "Model",
    "ModelLike",
    "Preprocessing",
    "as_model",
    "list_models",
    "load_model",
]
