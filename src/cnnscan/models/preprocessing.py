"""How a model wants its pixels: size, resize/crop, interpolation, mean/std, and the way back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from cnnscan.errors import ModelError

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

    `size` is the final (height, width); `mean` and `std` apply to pixels in 0..1. The
    geometry is one of:

    - `resize_shorter=N` (default 256): the shorter side is resized to N (aspect kept) and
      the centre `size` is cropped, as torchvision's ImageNet transforms do;
    - `resize_to=(height, width)`: resized to exactly that (aspect not kept), then the
      centre `size` cropped: timm's "squash" crop mode;
    - `crop_fraction=f` (with `resize_shorter=None`): a centre square of f × the shorter
      side is cropped first, then resized to `size`, as TensorFlow's reference pipelines do
      (EfficientNet, Inception: the crop side is the float32 product truncated, offsets
      ((side − crop) + 1) // 2);
    - `resize_shorter=None` alone: the whole picture resized straight to `size`.

    `origin` says where the pipeline comes from (the weights' metadata, or an assumption);
    it is shown with `describe()` and ignored when comparing.
    """

    size: tuple[int, int] = (224, 224)
    resize_shorter: int | None = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_to: tuple[int, int] | None = None
    crop_fraction: float | None = None
    origin: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (height, width) with positive values, got {self.size}")
        if self.crop_fraction is not None:
            if not 0 < self.crop_fraction <= 1:
                raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")
            if self.resize_shorter is not None or self.resize_to is not None:
                raise ValueError(
                    "crop_fraction crops before resizing: pass resize_shorter=None and no "
                    "resize_to with it"
                )

    def view(self, image: Image.Image) -> Image.Image:
        """The RGB picture exactly as the model sees it (resized and cropped, not normalized)."""
        height, width = self.size
        resample = _RESAMPLE[self.interpolation]
        if self.crop_fraction is not None:
            return image.crop(self.crop_box(image.width, image.height)).resize(
                (width, height), resample
            )
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

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the centre crop taken before the resize, as
        TensorFlow computes it: side int(float32(crop_fraction) × float32(shorter side)), at
        least 1 px; offsets ((side − crop) + 1) // 2. The whole picture without a crop."""
        if self.crop_fraction is None:
            return 0, 0, width, height
        product = np.float32(self.crop_fraction) * np.float32(min(width, height))
        crop = max(int(product), 1)
        left, top = (width - crop + 1) // 2, (height - crop + 1) // 2
        return left, top, left + crop, top + crop

    def describe(self, origin: bool = False) -> str:
        """The pipeline in one line, e.g. "centre crop 87.5 % of the shorter side, bicubic to
        224×224, (x − 127)/128" (x: a pixel in 0..255); with `origin`, where it comes from."""
        height, width = self.size
        size = f"{height}×{width}"
        if self.crop_fraction is not None:
            percent = f"{100 * self.crop_fraction:.4g}"
            steps = [
                f"centre crop {percent} % of the shorter side",
                f"{self.interpolation} to {size}",
            ]
        elif self.resize_to is not None:
            squashed = f"{self.resize_to[0]}×{self.resize_to[1]}"
            steps = [f"{self.interpolation} to {squashed} (aspect not kept)", f"centre crop {size}"]
        elif self.resize_shorter is None:
            steps = [f"{self.interpolation} to {size} (aspect not kept)"]
        else:
            steps = [
                f"shorter side {self.interpolation} to {self.resize_shorter}",
                f"centre crop {size}",
            ]
        line = ", ".join([*steps, self._describe_normalization()])
        return f"{line} ({self.origin})" if origin and self.origin else line

    def _describe_normalization(self) -> str:
        if (self.mean, self.std) == (IMAGENET_MEAN, IMAGENET_STD):
            return "ImageNet mean/std"
        if len(set(self.mean)) == 1 and len(set(self.std)) == 1:
            mean, std = 255 * self.mean[0], 255 * self.std[0]
            return f"(x − {mean:.6g})/{std:.6g}"
        means = ", ".join(f"{v:.6g}" for v in self.mean)
        stds = ", ".join(f"{v:.6g}" for v in self.std)
        return f"mean ({means}), std ({stds}) on 0..1"

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


# -- named pipelines, for models whose files do not record theirs (ONNX, Keras, a module) --------
TF_CROP_FRACTION = 224 / (224 + 32)  # tensorflow/tpu's CROP_PADDING = 32 at 224 px

PRESETS: dict[str, str] = {
    "imagenet": "torchvision's: shorter side bilinear to size/0.875, centre crop, ImageNet "
    "mean/std (the normalization of Keras' preprocess_input mode 'torch')",
    "inception": "timm's for TensorFlow's Inception ports: shorter side bicubic to "
    "size/0.875, centre crop, x/127.5 − 1 (Keras' mode 'tf')",
    "efficientnet-lite": "TensorFlow EfficientNet-Lite's: centre crop 87.5 % of the shorter "
    "side, bicubic, (x − 127)/128",
}


def assumed(what: str) -> str:
    """The origin of a pipeline cnnscan assumes because `what` does not record one."""
    return (
        f"assumed: {what} does not record its preprocessing; say it with "
        "load_model(..., preprocessing=) or --preprocessing"
    )


def preset(name: str, size: tuple[int, int] = (224, 224), origin: str = "") -> Preprocessing:
    """The named pipeline (see `PRESETS`) at `size` (height, width)."""
    key = name.strip().lower().replace("_", "-")
    shorter = math.floor(min(size) / TF_CROP_FRACTION)
    if key == "imagenet":
        return Preprocessing(size=size, resize_shorter=shorter, origin=origin)
    if key == "inception":
        half = (0.5, 0.5, 0.5)
        return Preprocessing(size, shorter, "bicubic", mean=half, std=half, origin=origin)
    if key == "efficientnet-lite":
        return Preprocessing(
            size=size,
            resize_shorter=None,
            crop_fraction=TF_CROP_FRACTION,
            interpolation="bicubic",
            mean=(127 / 255,) * 3,
            std=(128 / 255,) * 3,
            origin=origin,
        )
    if key == "caffe":
        raise ModelError(
            "Keras' 'caffe' mode (VGG16, ResNet50) expects BGR pixels and cnnscan feeds RGB: "
            "build the channel flip and mean subtraction into the model"
        )
    raise ModelError(f"unknown preprocessing {name!r}; presets: {', '.join(PRESETS)}")


def parse_preprocessing(spec: str, size: tuple[int, int] = (224, 224)) -> Preprocessing:
    """A pipeline from text: a preset name and/or KEY=VALUE items, comma-separated, e.g.
    "inception", "imagenet,size=299", "crop=0.875,interpolation=bicubic,mean=0.5,std=0.5".
    Keys: size (N or HxW; default `size`), crop (fraction of the shorter side cropped before
    the resize), resize (N: shorter side to N then centre crop; `squash`: straight to size),
    interpolation, mean and std (one value or three, on 0..1). The base is `imagenet`."""
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    name = tokens.pop(0) if tokens and "=" not in tokens[0] else "imagenet"
    items: dict[str, list[str]] = {}
    key = ""
    for token in tokens:
        if "=" in token:
            key, _, value = token.partition("=")
            key = key.strip().lower()
            items[key] = [value.strip()]
        elif key in ("mean", "std"):  # the 2nd and 3rd values of mean=a,b,c
            items[key].append(token)
        else:
            raise ModelError(f"preprocessing {spec!r}: expected KEY=VALUE, got {token!r}")
    unknown = sorted(set(items) - {"size", "crop", "resize", "interpolation", "mean", "std"})
    if unknown:
        raise ModelError(
            f"preprocessing {spec!r}: unknown key {unknown[0]!r}; keys: size, crop, resize, "
            "interpolation, mean, std"
        )
    try:
        if "size" in items:
            size = _size(items["size"][0])
        result = preset(name, size, origin=f"given: {spec.strip()}")
        changes: dict[str, object] = {}
        if "crop" in items and "resize" in items:
            raise ValueError("crop (before the resize) and resize (then a crop) exclude each other")
        if "crop" in items:
            changes.update(crop_fraction=float(items["crop"][0]), resize_shorter=None)
        if "resize" in items:
            value = items["resize"][0].lower()
            shorter = None if value == "squash" else int(value)
            changes.update(resize_shorter=shorter, crop_fraction=None)
        if "interpolation" in items:
            changes["interpolation"] = items["interpolation"][0].lower()
        for stat in ("mean", "std"):
            if stat in items:
                changes[stat] = _triple(stat, items[stat])
        return replace(result, **changes)
    except ValueError as e:
        raise ModelError(f"preprocessing {spec!r}: {e}") from e


def _size(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    if not (height.strip().isdigit() and (not width or width.strip().isdigit())):
        raise ValueError(f"size is N or HxW, got {text!r}")
    return int(height), int(width or height)


def _triple(name: str, values: list[str]) -> tuple[float, float, float]:
    numbers = [float(v) for v in values]
    if len(numbers) not in (1, 3):
        raise ValueError(f"{name} takes one value or three, got {len(numbers)}")
    if max(numbers) > 1:
        raise ValueError(f"{name} is on the 0..1 scale (divide 0..255 values by 255)")
    first, second, third = numbers * 3 if len(numbers) == 1 else numbers
    return first, second, third
