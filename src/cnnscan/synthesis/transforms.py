"""Robustness transforms: small random changes applied to the image before each forward.

An image that excites a unit only at one exact position and scale is an adversarial
pattern, not a feature. Optimizing through random padding, shifts, scalings and rotations
(lucid's "transformation robustness") keeps what survives them. A transform is a function
`(pixels (B, 3, H, W) in [0, 1], generator) -> pixels`; its randomness comes from the
generator, so a seed reproduces the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from cnnscan.errors import MethodError

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _choice(options: Sequence[float], generator: torch.Generator) -> float:
    return options[int(torch.randint(len(options), (), generator=generator))]


def pad(width: int, value: float = 0.5) -> Transform:
    """Pad every side by `width` pixels of constant `value` (grey by default)."""

    def apply(x: torch.Tensor, _generator: torch.Generator) -> torch.Tensor:
        return F.pad(x, [width] * 4, value=value)

    return apply


def jitter(d: int) -> Transform:
    """Crop a random (H − d, W − d) window: shifts the content by 0..d pixels."""
    if d < 1:
        raise MethodError(f"jitter needs d >= 1, got {d}")

    def apply(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        dy, dx = torch.randint(d + 1, (2,), generator=generator).tolist()
        h, w = x.shape[-2:]
        return x[..., dy : dy + h - d, dx : dx + w - d]

    return apply


def random_scale(scales: Sequence[float]) -> Transform:
    """Resize by a factor drawn from `scales` (bilinear)."""

    def apply(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        scale = _choice(scales, generator)
        if scale == 1:
            return x
        size = [math.ceil(scale * s) for s in x.shape[-2:]]
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

    return apply


def random_rotate(degrees: Sequence[float]) -> Transform:
    """Rotate about the centre by an angle drawn from `degrees`; corners fill with black."""

    def apply(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        angle = math.radians(_choice(degrees, generator))
        if angle == 0:
            return x
        h, w = x.shape[-2:]
        cos, sin = math.cos(angle), math.sin(angle)
        # affine_grid works in [-1, 1] coordinates: correct for the aspect ratio.
        theta = torch.tensor(
            [[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=x.dtype, device=x.device
        )
        grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    return apply


def compose(transforms: Sequence[Transform]) -> Transform:
    """Apply `transforms` in order."""

    def apply(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for transform in transforms:
            x = transform(x, generator)
        return x

    return apply


def standard() -> list[Transform]:
    """lucent's standard set: pad 12 (grey), jitter 8, scale 0.9–1.1, rotate ±10°, jitter 4."""
    return [
        pad(12, value=0.5),
        jitter(8),
        random_scale([1 + (i - 5) / 50 for i in range(11)]),
        random_rotate([*range(-10, 11), *[0] * 5]),
        jitter(4),
    ]


PRESETS: dict[str, Callable[[], list[Transform]]] = {
    "standard": standard,
    "jitter": lambda: [jitter(4)],
    "none": list,
}


def resolve(transforms: str | Sequence[Transform] | None) -> Transform:
    """A preset name ("standard", "jitter", "none"), None (no transforms) or a list."""
    if transforms is None:
        return compose([])
    if isinstance(transforms, str):
        if transforms not in PRESETS:
            raise MethodError(
                f"unknown transforms {transforms!r}; use one of {', '.join(PRESETS)} or a list "
                "of transforms (cnnscan.synthesis.transforms)"
            )
        return compose(PRESETS[transforms]())
    if callable(transforms):
        return transforms
    transforms = list(transforms)
    if not all(callable(t) for t in transforms):
        raise MethodError("transforms must be callables (pixels, generator) -> pixels")
    return compose(transforms)
