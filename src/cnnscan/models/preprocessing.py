"""How a model wants its pixels: size, resize/crop, interpolation, mean/std, and the way back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocessing:
    """Turn an RGB picture into the normalized tensor a model expects.

    `size` is the final (height, width). With `resize_shorter=None` the picture is resized
    straight to `size`; otherwise its shorter side is resized to `resize_shorter` (aspect
    kept) and the centre `size` is cropped, as torchvision's ImageNet transforms do.
    `resize_to=(height, width)` instead resizes to exactly that size (aspect not kept) before
    the centre crop: timm's "squash" crop mode.
    """

    size: tuple[int, int] = (224, 224)
    resize_shorter: int | None = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_to: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (height, width) with positive values, got {self.size}")

    def view(self, image: Image.Image) -> Image.Image:
        """The RGB picture exactly as the model sees it (resized and cropped, not normalized)."""
        height, width = self.size
        resample = _RESAMPLE[self.interpolation]
        if self.resize_to is not None:
            return _center_crop(image.resize(self.resize_to[::-1], resample), height, width)
        if self.resize_shorter is None:
            return image.resize((width, height), resample)
        # torchvision's arithmetic exactly: the longer side is truncated, the crop offset
        # rounded (a crop larger than the resized picture is padded with black, as there).
        short, long = sorted(image.size)
        new_long = int(self.resize_shorter * long / short)
        if image.width <= image.height:
            new_w, new_h = self.resize_shorter, new_long
        else:
            new_w, new_h = new_long, self.resize_shorter
        return _center_crop(image.resize((new_w, new_h), resample), height, width)

    def __call__(
        self, image: Image.Image, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """A (1, 3, H, W) float tensor, normalized, on `device`."""
        pixels = np.asarray(self.view(image), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).unsqueeze(0)
        return self.normalize(tensor.to(device))

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
        return mean, std

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> model input."""
        mean, std = self._stats(pixels)
        return (pixels - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model input -> pixels (nominally in [0, 1])."""
        mean, std = self._stats(x)
        return x * std + mean


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """torchvision's CenterCrop arithmetic: offsets rounded, and a crop larger than the
    picture pads it with black, the odd pixel going to the right/bottom."""

    def offset(size: int, crop: int) -> int:
        return -((crop - size) // 2) if crop > size else round((size - crop) / 2.0)

    left, top = offset(image.width, width), offset(image.height, height)
    return image.crop((left, top, left + width, top + height))
