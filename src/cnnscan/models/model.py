"""`Model`: a classifier module with the preprocessing and class labels that go with it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn

from cnnscan.engine.working_copy import forward_logits
from cnnscan.errors import ModelError
from cnnscan.images import load_image
from cnnscan.models.labels import resolve_labels
from cnnscan.models.preprocessing import Preprocessing, assumed


@dataclass
class Model:
    """A classifier `module` (never modified by cnnscan), its preprocessing and class labels."""

    module: nn.Module
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    labels: tuple[str, ...] = ()
    name: str = "model"

    @property
    def device(self) -> torch.device:
        """Where the module's parameters live (CPU for a parameter-free module)."""
        tensor = next(self.module.parameters(), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def preprocess(self, image: Any) -> torch.Tensor:
        """Any image `load_image` accepts -> a (1, 3, H, W) input tensor on the model's device."""
        return self.preprocessing(load_image(image), device=self.device)

    def inputs(self, image: Any, device: torch.device | None = None) -> torch.Tensor:
        """A (N, 3, H, W) input tensor on `device` (default: the model's) from a preprocessed
        float tensor (used as it is), an image, or a list of images."""
        device = device or self.device
        if isinstance(image, torch.Tensor) and image.is_floating_point():
            return (image.unsqueeze(0) if image.ndim == 3 else image).to(device)
        if isinstance(image, list | tuple):
            return torch.cat([self.inputs(item, device) for item in image])
        return self.preprocess(image).to(device)

    def view(self, image: Any) -> Image.Image:
        """The RGB picture as the model sees it (resized, cropped), for overlays."""
        return self.preprocessing.view(load_image(image))


def wrap_module(module: nn.Module, name: str, preprocessing: Preprocessing | None = None) -> Model:
    """A `Model` around a plain classifier module, with ImageNet labels for 1000 outputs."""
    preprocessing = preprocessing or Preprocessing(origin=assumed("a module"))
    return Model(
        module=module,
        preprocessing=preprocessing,
        labels=resolve_labels(None, count_outputs(module, preprocessing)),
        name=name,
    )


def count_outputs(module: nn.Module, preprocessing: Preprocessing) -> int:
    """Number of classes, read from the last Linear layer or, failing that, one forward."""
    last_linear = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if last_linear:
        return last_linear[-1].out_features
    probe = torch.zeros(1, 3, *preprocessing.size)
    try:
        return forward_logits(module, probe).shape[1]
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(
            f"the model fails on a zero {tuple(probe.shape)} input, run to count its classes "
            f"({type(e).__name__}: {e}); if it expects another input size, pass "
            "preprocessing=Preprocessing(size=(H, W))"
        ) from e
