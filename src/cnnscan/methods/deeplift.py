"""Gradient family, DeepLIFT: multipliers Δout/Δin through every nonlinearity instead of the
local gradient (the rescale rule, `cnnscan.engine.rescale`), times (input − reference), and
DeepLIFT-SHAP, its average over several references. One forward of [inputs; references]
and a backward per target; Σ attributions = f(x) − f(x′) holds exactly (summation to delta)
up to the products of activations the rule leaves to the gradient."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from cnnscan.methods.baselines import make_baseline
from cnnscan.methods.gradient import baseline_pool, completeness
from cnnscan.methods.options import generator
from cnnscan.methods.registry import MethodResult, register

if TYPE_CHECKING:
    from cnnscan.scan import Scan


def _rescale(
    scan: Scan, inputs: torch.Tensor, references: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(multipliers · (input − reference) (M, T, 3, H, W), f(input) − f(reference) (M, T))."""
    maps = inputs.new_empty((*targets.shape, *inputs.shape[1:]))
    delta = inputs.new_empty(targets.shape)
    for rows, multipliers, difference in scan.iter_multipliers(inputs, references, targets):
        maps[rows] = multipliers * (inputs[rows] - references[rows]).unsqueeze(1)
        delta[rows] = difference
    return maps, delta


def _extras(maps: torch.Tensor, delta: torch.Tensor, **more: Any) -> dict[str, Any]:
    error, relative = completeness(maps, delta)
    return {
        **more,
        "completeness_error": error.cpu(),
        "completeness_error_relative": relative.cpu(),
        "delta": delta.cpu(),
    }


@register(
    "deeplift",
    family="gradient",
    description="DeepLIFT (rescale rule): multipliers Δout/Δin through every nonlinearity, "
    "times (input − baseline); sums to f(x) − f(x′).",
    cost="1 forward of 2 images + 1 backward per target",
    paper="Shrikumar et al. 2017, arXiv:1704.02685",
    in_default_scan=False,
)
def deeplift(
    scan: Scan, targets: torch.Tensor, *, baseline: str | torch.Tensor = "black", seed: int = 0
) -> MethodResult:
    """`baseline`: a kind of `make_baseline` ("black", "zero" is captum's default, ...) or a
    tensor; `seed` draws the "noise" baseline."""
    inputs = scan.inputs
    references = make_baseline(scan, baseline, generator(seed)).contiguous()
    maps, delta = _rescale(scan, inputs, references, targets)
    kind = baseline if isinstance(baseline, str) else "tensor"
    return MethodResult(maps, _extras(maps, delta, baseline=kind))


@register(
    "deeplift_shap",
    family="gradient",
    description="DeepLIFT-SHAP: DeepLIFT averaged over a set of baselines (an approximation "
    "of SHAP values); sums to f(x) − mean f(x′).",
    cost="1 forward of 2 images per baseline + 1 backward per target",
    paper="Lundberg & Lee 2017, arXiv:1705.07874 (DeepLIFT: Shrikumar et al. 2017)",
    in_default_scan=False,
)
def deeplift_shap(
    scan: Scan,
    targets: torch.Tensor,
    *,
    baselines: tuple[str, ...] | list[str] | torch.Tensor = ("black", "blur", "noise"),
    seed: int = 0,
) -> MethodResult:
    """Every baseline is used (captum's DeepLiftShap): kinds of `make_baseline` or a tensor
    (B, 3, H, W) of reference inputs."""
    pool = baseline_pool(scan, baselines, generator(seed))  # (N, B, 3, H, W)
    n, b = pool.shape[:2]
    inputs = scan.inputs.repeat_interleave(b, dim=0)
    maps, delta = _rescale(
        scan, inputs, pool.reshape(n * b, *pool.shape[2:]), targets.repeat_interleave(b, dim=0)
    )
    maps = maps.view(n, b, *maps.shape[1:]).mean(dim=1)
    delta = delta.view(n, b, -1).mean(dim=1)
    return MethodResult(maps, _extras(maps, delta, n_baselines=b))
