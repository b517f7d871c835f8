"""Reference inputs ("baselines") in model space, for Integrated Gradients, GradientSHAP,
perturbation fills and the substrates of deletion/insertion curves."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from cnnscan.errors import MethodError
from cnnscan.methods.options import generator

if TYPE_CHECKING:
    from cnnscan.scan import Scan

BASELINES = ("black", "zero", "mean", "blur", "noise")


def make_baseline(
    scan: Scan, baseline: str | torch.Tensor, gen: torch.Generator | None = None
) -> torch.Tensor:
    """A reference input per image of the scan, in model space: "black", "zero" (all-zero
    tensor, captum's default), "mean" (each image's mean colour), "blur", "noise" (uniform
    random pixels, the same for every image) or a tensor (3, H, W) / (N, 3, H, W)."""
    inputs = scan.inputs
    if isinstance(baseline, torch.Tensor):
        base = baseline.detach().to(inputs.device, inputs.dtype)
        try:
            return base.expand_as(inputs)
        except RuntimeError as e:
            raise MethodError(
                f"baseline of shape {tuple(baseline.shape)} does not match inputs "
                f"{tuple(inputs.shape)}"
            ) from e
    if not isinstance(baseline, str) or baseline not in BASELINES:
        raise MethodError(
            f"unknown baseline {baseline!r}; use one of {', '.join(BASELINES)} or a tensor"
        )
    normalize = scan.model.preprocessing.normalize
    if baseline == "black":
        return normalize(torch.zeros_like(inputs))
    if baseline == "zero":
        return torch.zeros_like(inputs)
    if baseline == "mean":
        return inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs)
    if baseline == "blur":
        return gaussian_blur(inputs, sigma=max(inputs.shape[-2:]) / 16)
    gen = gen or generator(0)
    pixels = torch.rand((1, *inputs.shape[1:]), generator=gen).to(inputs)
    return normalize(pixels).expand_as(inputs)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W), reflect padding, radius 3σ (within the image)."""
    radius = max(1, min(int(3 * sigma), min(x.shape[-2:]) - 1))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    out = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
