"""Infidelity (Yeh et al. 2019, arXiv:1901.09392): how well the map, read as a linear model
of the output, predicts the change of the output when the input moves,

    INFD = E_I[(β Σ_p I_p R_p − (f(x) − f(x − I)))²],

with f the target's logit, R the relevance (the reduction every metric uses), I a
perturbation of the pixels and β the scale that minimises the error, β = E[IᵀR·Δf] / E[(IᵀR)²]
(captum's `normalize=True`): maps of any scale compare, and only their shape counts.
I is Gaussian noise of σ = noise_level · the input's span (max − min), one value per pixel
shared by its channels (the relevance has one value per pixel), n_samples draws from a
seeded CPU generator, the same for every image (scaled by its span), so an image scores alike
alone or in any batch. The draws do not depend on the map, so one batched pass of n_samples
forwards per image serves every map and every target of that image. Lower is better.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cnnscan.errors import MetricError
from cnnscan.methods.options import generator
from cnnscan.metrics.registry import MetricContext, number_text, register_metric
from cnnscan.scan import Scan


def pixel_noise(scan: Scan, n_samples: int, noise_level: float, seed: int) -> torch.Tensor:
    """Perturbations (N, n_samples, H, W): Gaussian, σ = noise_level · each input's span; the
    same draws for every image, so an image scores alike alone or in any batch."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise MetricError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if not isinstance(noise_level, int | float) or not 0 < noise_level < float("inf"):
        raise MetricError(f"noise_level must be a number > 0, got {noise_level!r}")
    inputs = scan.inputs
    n, _, h, w = inputs.shape
    span = (inputs.amax(dim=(1, 2, 3)) - inputs.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)
    draws = torch.randn((n_samples, h, w), generator=generator(seed))
    return draws.to(inputs).expand(n, -1, -1, -1) * noise_level * span


class _Perturbed:
    """x_i − I_{i,s} for every image i and draw s (row i · S + s), built chunk by chunk."""

    def __init__(self, inputs: torch.Tensor, noise: torch.Tensor):
        self.inputs, self.noise = inputs, noise.flatten(0, 1)
        self.samples = noise.shape[1]

    def __len__(self) -> int:
        return len(self.noise)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        index = torch.arange(len(self), device=self.inputs.device)[rows]
        return self.inputs[index // self.samples] - self.noise[rows].unsqueeze(1)


def infidelity(
    scan: Scan,
    rel: torch.Tensor,
    image: torch.Tensor,
    target: torch.Tensor,
    noise: torch.Tensor,
    progress=None,
) -> torch.Tensor:
    """Infidelity (M,) of relevance maps `rel` (M, H, W) of images `image` (M,) for classes
    `target` (M,), under the perturbations `noise` (N, S, H, W) (see module doc)."""
    n, samples = noise.shape[:2]
    logits = scan.logits_at(_Perturbed(scan.inputs, noise), progress).view(n, samples, -1)
    base = scan.logits.detach()
    change = base[image, target].unsqueeze(1) - logits[image, :, target]  # (M, S)
    dots = torch.einsum("msp,mp->ms", noise.flatten(2)[image].double(), rel.flatten(1).double())
    change = change.double()
    a2, ab, b2 = (dots**2).sum(1), (dots * change).sum(1), (change**2).sum(1)
    beta = torch.where(a2 > 0, ab / a2.clamp_min(1e-300), torch.zeros_like(a2))
    return ((beta**2 * a2 - 2 * beta * ab + b2) / samples).cpu()


@register_metric(
    "infidelity",
    family="faithfulness",
    description="Mean squared error between the map (best-scaled) times a Gaussian pixel "
    "perturbation and the drop of the target's logit under it (n_samples draws of σ = "
    "noise_level × the input's span).",
    higher_is_better=False,
    default=False,
    title="infid↓",
    show=lambda v: f"{v:.3g}" if isinstance(v, float) and math.isfinite(v) else number_text(v),
    cost="n_samples forwards per image, shared by every map",
    paper="Yeh et al. 2019, arXiv:1901.09392",
)
def infidelity_metric(ctx: MetricContext) -> dict[str, dict[str, Any]]:
    noise = pixel_noise(ctx.scan, ctx.n_samples, ctx.noise_level, ctx.seed)
    values = infidelity(ctx.scan, ctx.stacked, ctx.image_ids, ctx.target_ids, noise, ctx.progress)
    split = ctx.split(values)
    return {name: {"infidelity": split[name]} for name in ctx.names}
