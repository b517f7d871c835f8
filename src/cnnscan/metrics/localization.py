"""Localization: does the map point at the object? Pointing game and energy in a box/mask.

The region is a box (x0, y0, x1, y1) covering pixels x0 ≤ x < x1, y0 ≤ y < y1, or a mask,
given in the coordinates of the picture the user has; it goes through the model's own
resize and centre crop (nearest neighbour), so it lands on the input the map explains.

- Pointing game (Zhang et al. 2018, arXiv:1608.00507): a hit when the map's maximum lies
  in the region grown by `tolerance` pixels (15 in the paper). With several maximal pixels
  the score is the fraction of them that hit, so a constant map scores the region's share
  of the image (chance), and a map with one maximum scores 0 or 1.
- Energy in box (Wang et al. 2020, Score-CAM's energy-based pointing game): the share of
  the positive relevance inside the region, Σ_region R⁺ / Σ R⁺. A map with no positive
  relevance (all zero, or constant) spreads it evenly: its score is the region's share.
- Relevance rank accuracy (Arras et al. 2022, arXiv:2003.07258): with K the region's pixel
  count, the share of the K most relevant pixels inside the region (quantus 0.6's
  `RelevanceRankAccuracy`). Ties are ordered by the deletion curve's seeded permutation, so
  a constant map scores about the region's share.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cnnscan.errors import ImageError, MetricError
from cnnscan.metrics.faithfulness import deletion_order
from cnnscan.metrics.registry import MetricContext, number_text, register_metric
from cnnscan.models.preprocessing import Preprocessing


def _box_values(box: Sequence[float] | str) -> tuple[float, float, float, float]:
    if isinstance(box, str):
        box = [part for part in box.replace(" ", "").split(",") if part]
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise MetricError(f"a box is four numbers x0,y0,x1,y1 (pixels), got {box!r}")
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise MetricError(f"box {box!r} is empty: it needs x0 < x1 and y0 < y1")
    return values


def box_mask(box: Sequence[float] | str, size: tuple[int, int]) -> np.ndarray:
    """A bool mask (H, W) of `size` = (H, W) covering the box clipped to the picture; an
    error if nothing of it is inside."""
    x0, y0, x1, y1 = _box_values(box)
    height, width = size
    cols = np.arange(width) + 0.5  # pixel centres
    rows = np.arange(height) + 0.5
    mask = ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]
    if not mask.any():
        raise MetricError(
            f"box {box!r} lies outside the picture ({width}×{height} pixels); give "
            "x0,y0,x1,y1 in the picture's pixel coordinates"
        )
    return mask


def load_mask(mask: Any) -> np.ndarray:
    """A bool (H, W) mask from a file, PIL image, array or tensor: pixels at least half as
    bright as the brightest are inside (so 0/1 and 0/255 masks both work)."""
    if isinstance(mask, str | Path):
        try:
            with Image.open(mask) as opened:
                mask = np.asarray(opened.convert("L"))
        except (OSError, ValueError) as e:
            raise ImageError(f"cannot read the mask file {str(mask)!r}: {e}") from e
    elif isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    elif isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    values = np.asarray(mask)
    if values.ndim == 3 and values.shape[-1] in (3, 4):
        values = values[..., :3].max(axis=-1)
    values = np.squeeze(values) if values.ndim > 2 else values
    if values.ndim != 2:
        raise MetricError(f"a mask is one (H, W) plane, got shape {np.asarray(mask).shape}")
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise MetricError("the mask contains NaN/Inf values")
    top = values.max(initial=0.0)
    if top <= 0:
        raise MetricError("the mask is empty (no pixel is set)")
    return values >= top / 2


def region(
    input_size: tuple[int, int],
    *,
    box: Sequence[float] | str | None = None,
    mask: Any = None,
    picture: Image.Image | None = None,
    preprocessing: Preprocessing | None = None,
) -> torch.Tensor:
    """The region (H, W) bool on the model input, from a box or a mask in the picture's
    coordinates (or the input's, when there is no picture or the mask has its size)."""
    if (box is None) == (mask is None):
        raise MetricError("give exactly one of box= (x0,y0,x1,y1) or mask=")
    height, width = input_size
    source = (picture.height, picture.width) if picture is not None else input_size
    if box is not None:
        plane = box_mask(box, source)
    else:
        plane = load_mask(mask)
        sizes = {source, tuple(input_size)}
        if plane.shape not in sizes:
            expected = " or ".join(f"{w}×{h}" for h, w in sorted(sizes, reverse=True))
            raise MetricError(
                f"the mask is {plane.shape[1]}×{plane.shape[0]} pixels; it must match the "
                f"picture or the model input: {expected} (width×height)"
            )
    if plane.shape != tuple(input_size):
        assert picture is not None and preprocessing is not None
        nearest = dataclasses.replace(preprocessing, interpolation="nearest")
        seen = nearest.view(Image.fromarray(plane.astype(np.uint8) * 255))
        plane = np.asarray(seen) >= 128
        if not plane.any():
            raise MetricError(
                "the region falls outside the centre crop the model sees; move it inside "
                f"the crop or give it in model-input coordinates ({width}×{height})"
            )
    return torch.from_numpy(plane.copy())


def _grow(region: torch.Tensor, tolerance: int) -> torch.Tensor:
    """The region (M, H, W) grown by a disc of radius `tolerance` pixels."""
    if tolerance <= 0:
        return region
    offsets = torch.arange(-tolerance, tolerance + 1, dtype=torch.float32)
    disc = (offsets.view(-1, 1) ** 2 + offsets.view(1, -1) ** 2) <= tolerance**2
    kernel = disc.float().view(1, 1, *disc.shape).to(region.device)
    hits = F.conv2d(region.float().unsqueeze(1), kernel, padding=tolerance)
    return hits.squeeze(1) > 0


def pointing_game(rel: torch.Tensor, region: torch.Tensor, tolerance: int = 15) -> torch.Tensor:
    """Per map (M, H, W) with regions (M, H, W): the share of its maximal pixels that fall
    in the region grown by `tolerance` pixels, (M,)."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise MetricError(f"tolerance must be a whole number of pixels >= 0, got {tolerance!r}")
    grown = _grow(region, tolerance)
    top = rel == rel.amax(dim=(-2, -1), keepdim=True)
    return ((top & grown).sum(dim=(-2, -1)) / top.sum(dim=(-2, -1))).double()


def energy_in_box(rel: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per map (M, H, W): Σ_region R⁺ / Σ R⁺, the region's share when Σ R⁺ = 0, (M,)."""
    positive = rel.double().clamp_min(0)
    total = positive.sum(dim=(-2, -1))
    inside = (positive * region).sum(dim=(-2, -1))
    share = region.double().mean(dim=(-2, -1)).expand_as(total)
    return torch.where(total > 0, inside / total.clamp_min(1e-300), share)


def _located(ctx: MetricContext, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """`score(rel, region)` of every map whose image has a region; NaN for the others."""
    regions = ctx.regions or [None] * len(ctx.scan.inputs)
    has = torch.tensor([r is not None for r in regions], device=ctx.stacked.device)
    values = torch.full((len(ctx.stacked),), math.nan, dtype=torch.float64)
    rows = has[ctx.image_ids].nonzero().flatten()
    if len(rows):
        planes = torch.stack([r if r is not None else torch.zeros(()) for r in regions])
        area = planes.to(ctx.stacked.device)[ctx.image_ids[rows]]
        values[rows.cpu()] = score(ctx.stacked[rows], area).cpu().double()
    return ctx.split(values)


@register_metric(
    "pointing_game",
    family="localization",
    description="Whether the map's maximum falls in the object region (grown by `tolerance` "
    "pixels); with ties, the share of maximal pixels that do.",
    higher_is_better=True,
    needs_region=True,
    reference=True,
    aliases=("pointing",),
    title="pointing↑",
    show=lambda v: number_text(v, 2),
    cost="free",
    paper="Zhang et al. 2018, arXiv:1608.00507",
)
def pointing_game_metric(ctx: MetricContext) -> dict[str, dict[str, Any]]:
    hits = _located(ctx, lambda rel, area: pointing_game(rel, area, ctx.tolerance))
    return {name: {"pointing_game": hits[name]} for name in ctx.names}


@register_metric(
    "energy_in_box",
    family="localization",
    description="Share of the positive relevance inside the object region.",
    higher_is_better=True,
    needs_region=True,
    reference=True,
    aliases=("energy",),
    title="energy↑",
    cost="free",
    paper="Wang et al. 2020 (Score-CAM), arXiv:1910.01279",
)
def energy_in_box_metric(ctx: MetricContext) -> dict[str, dict[str, Any]]:
    energy = _located(ctx, energy_in_box)
    return {name: {"energy_in_box": energy[name]} for name in ctx.names}


def rank_accuracy(rel: torch.Tensor, region: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Per map (M, H, W): the share of its K most relevant pixels inside the region of K
    pixels (M,)."""
    inside = region.bool().expand_as(rel)
    k = inside.flatten(1).sum(dim=1, keepdim=True)
    top = deletion_order(rel, seed).flatten(1) < k
    return (top & inside.flatten(1)).sum(dim=1).double() / k.squeeze(1).double()


@register_metric(
    "relevance_rank_accuracy",
    family="localization",
    description="Share of the K most relevant pixels that lie in the object region of K pixels.",
    higher_is_better=True,
    needs_region=True,
    default=False,
    aliases=("rank_accuracy",),
    title="rank-acc↑",
    cost="free",
    paper="Arras et al. 2022, arXiv:2003.07258",
)
def relevance_rank_accuracy_metric(ctx: MetricContext) -> dict[str, dict[str, Any]]:
    accuracy = _located(ctx, lambda rel, area: rank_accuracy(rel, area, ctx.seed))
    return {name: {"relevance_rank_accuracy": accuracy[name]} for name in ctx.names}
