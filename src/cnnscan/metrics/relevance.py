"""One reduction from any attribution map to a per-pixel relevance at input resolution.

Maps arrive as (N, T, C, h, w): CAMs at a layer's resolution with C = 1, input-space maps
with C = 3, signed or not. Every metric reads them through `relevance`: the channels are
reduced first (Σ_c |a_c| by default), then the (N, T, h, w) result is resized bilinearly to
the input (as `Attribution.upsample` does). "abs" is the default because it is what the
report shows (the heatmap view is Σ_c |a_c|) and the only reading common to every method: a
gradient's sign is a direction of sensitivity, not evidence for or against the class.
"signed" (Σ_c a_c) suits methods whose maps are contributions (gradient × input, IG, LRP,
occlusion); "positive" keeps only the evidence for the class (Σ_c relu(a_c)).
"""

from __future__ import annotations

import torch

from cnnscan.attribution import Attribution, resize_maps
from cnnscan.errors import MetricError

REDUCTIONS = ("abs", "signed", "positive")


def relevance(attr: Attribution, reduce: str = "abs") -> torch.Tensor:
    """Per-pixel relevance (N, T, H, W) at the input's resolution, float32 (see module doc)."""
    if reduce not in REDUCTIONS:
        raise MetricError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    maps = attr.maps.detach()
    if maps.ndim != 5:
        raise MetricError(
            f"{attr.method}: maps must be (images, targets, channels, h, w), got "
            f"{tuple(maps.shape)}"
        )
    check_finite(maps, attr.method)
    reduced = reduce_channels(maps.flatten(0, 1), reduce).unflatten(0, maps.shape[:2])
    return resize_maps(reduced, attr.input_size)[:, :, 0].float()


def reduce_channels(maps: torch.Tensor, reduce: str = "abs") -> torch.Tensor:
    """(M, C, h, w) -> (M, 1, h, w): Σ_c |a_c|, Σ_c a_c or Σ_c max(a_c, 0) (see module doc)."""
    if reduce not in REDUCTIONS:
        raise MetricError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if reduce == "abs":
        maps = maps.abs()
    elif reduce == "positive":
        maps = maps.clamp_min(0)
    return maps.sum(dim=1, keepdim=True)


def check_finite(maps: torch.Tensor, method: str) -> None:
    """A MetricError naming the method if a map holds NaN or Inf (its ordering is undefined)."""
    bad = ~torch.isfinite(maps)
    if bool(bad.any()):
        raise MetricError(
            f"{method}: the map has {int(bad.sum())} NaN/Inf values of {maps.numel()}; "
            "metrics need finite maps (the method failed on this input: check the model's "
            "outputs and the method's options)"
        )


def is_constant(maps: torch.Tensor) -> torch.Tensor:
    """True for each (H, W) map of (..., H, W) whose values are all equal."""
    flat = maps.flatten(-2)
    return flat.amax(dim=-1) == flat.amin(dim=-1)


def random_attribution(
    attr: Attribution, seed: int = 0, size: tuple[int, int] | None = None
) -> Attribution:
    """A uniform-random map per (image, target), the chance reference: at input resolution,
    or at `size` (h, w) and upsampled like a CAM of that resolution."""
    n, t = attr.targets.shape
    gen = torch.Generator().manual_seed(seed)
    size = tuple(size or attr.input_size)
    maps = torch.rand((n, t, 1, *size), generator=gen).to(attr.inputs.device)
    return Attribution(
        maps=maps,
        targets=attr.targets,
        method="random" if size == tuple(attr.input_size) else f"random {size[0]}×{size[1]}",
        inputs=attr.inputs,
        scores=attr.scores,
        labels=attr.labels,
    )
