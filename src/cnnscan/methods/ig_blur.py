"""Gradient family, Blur IG: Integrated Gradients along the path of ever stronger Gaussian
blurs of the input instead of a straight line from a baseline (no baseline to choose)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from cnnscan.methods.options import count, number
from cnnscan.methods.registry import MethodResult, register

if TYPE_CHECKING:
    from cnnscan.scan import Scan


def _blur_matrix(
    size: int, sigma: float, dtype: torch.dtype, device, radius: int | None = None
) -> torch.Tensor:
    """(size, size): a 1-d Gaussian blur with zero outside the image, scipy.ndimage's
    `gaussian_filter(mode="constant")` kernel (radius int(4σ + 0.5), normalized over it),
    or cut at another `radius` (torchray's imsmooth: ⌈4σ⌉)."""
    if sigma == 0:
        return torch.eye(size, dtype=dtype, device=device)
    radius = int(4.0 * sigma + 0.5) if radius is None else radius
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    distance = torch.arange(size)[:, None] - torch.arange(size)[None, :]
    inside = distance.abs() <= radius
    matrix = torch.where(inside, kernel[(distance + radius).clamp(0, 2 * radius)], 0.0)
    return matrix.to(dtype=dtype, device=device)


def blur(images: torch.Tensor, sigma: float, radius: int | None = None) -> torch.Tensor:
    """Gaussian blur of (B, C, H, W) with zero outside the image (separable, as matrices);
    `radius` as in `_blur_matrix`."""
    rows = _blur_matrix(images.shape[-2], sigma, images.dtype, images.device, radius)
    cols = _blur_matrix(images.shape[-1], sigma, images.dtype, images.device, radius)
    return rows @ images @ cols.T


class _BlurPath:
    """blur(image, σ_s) for every image (outer) and step (inner), built chunk by chunk."""

    def __init__(self, inputs: torch.Tensor, sigmas: list[float]):
        self.inputs, self.sigmas = inputs, sigmas

    def __len__(self) -> int:
        return len(self.inputs) * len(self.sigmas)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        index = range(len(self))[rows]
        steps = len(self.sigmas)
        return torch.cat(
            [blur(self.inputs[i // steps][None], self.sigmas[i % steps]) for i in index]
        )


@register(
    "blur_ig",
    family="gradient",
    description="Blur IG: Integrated Gradients along the path from a strongly blurred input "
    "to the input (no baseline).",
    cost="n_steps forwards + backwards per target",
    paper="Xu et al. 2020, arXiv:2004.03383",
    in_default_scan=False,
)
def blur_ig(
    scan: Scan,
    targets: torch.Tensor,
    *,
    max_sigma: float = 50.0,
    n_steps: int = 100,
    grad_step: float = 0.01,
    sqrt: bool = False,
) -> MethodResult:
    """PAIR saliency 0.2.1's BlurIG: σ_s = s · max_sigma / n_steps (or its square root with
    `sqrt`), −Σ_s (σ_{s+1} − σ_s) · ∂blur/∂σ(σ_s) · ∇f(blur(x, σ_s)), ∂blur/∂σ by a forward
    difference of `grad_step`. The blur runs in model space with zeros outside the image."""
    max_sigma = number("max_sigma", max_sigma, positive=True)
    n_steps = count("n_steps", n_steps)
    grad_step = number("grad_step", grad_step, positive=True)
    scale = [float(i) * max_sigma / n_steps for i in range(n_steps + 1)]
    sigmas = [math.sqrt(s) for s in scale] if sqrt else scale
    widths = [sigmas[i + 1] - sigmas[i] for i in range(n_steps)]
    inputs = scan.inputs
    path = _BlurPath(inputs, sigmas[:-1])
    total = inputs.new_zeros((*targets.shape, *inputs.shape[1:]))
    repeated = targets.repeat_interleave(n_steps, dim=0)
    for rows, grads, _ in scan.iter_gradients(path, repeated):
        for k, i in enumerate(range(len(path))[rows]):
            image, step = divmod(i, n_steps)
            x = inputs[image][None]
            here = blur(x, sigmas[step])
            slope = (blur(x, sigmas[step] + grad_step) - here) / grad_step
            total[image] -= widths[step] * slope * grads[k]
    return MethodResult(total, {"max_sigma": max_sigma, "n_steps": n_steps, "sqrt": sqrt})
