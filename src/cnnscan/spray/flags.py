"""When a cluster's relevance looks like a shortcut: the mean of its maps (positive part,
scaled to sum 1) concentrates at the image border, or in a small fixed region. A watermark,
a copyright tag or a frame is both; an object the model should look at moves from image to
image, so the mean of its maps spreads out.

- border: the share of the mean relevance in the band of width size/16 along the four edges
  (23 % of the area) is at least BORDER_SHARE;
- small fixed region: the box around the fewest pixels that hold SPOT_SHARE of the mean
  relevance (and every pixel as relevant as the least of them) covers at most SPOT_AREA of
  the image.

A cluster needs MIN_SIZE maps to be flagged: the mean of one or two maps is no pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BORDER_SHARE = 0.5
SPOT_SHARE = 0.5
SPOT_AREA = 0.05
MIN_SIZE = 3


@dataclass(frozen=True)
class Finding:
    """What the mean map of a cluster says: shares, the region (x0, y0, x1, y1 as fractions
    of the side, x1/y1 exclusive) and the verdict with its reason ("" when not suspicious)."""

    border_share: float
    spot_area: float
    region: tuple[float, float, float, float]
    suspicious: bool
    reason: str


def border_band(size: int) -> np.ndarray:
    """(size, size) True within size/16 (at least one pixel) of an edge."""
    width = max(1, round(size / 16))
    band = np.zeros((size, size), dtype=bool)
    band[:width], band[-width:], band[:, :width], band[:, -width:] = True, True, True, True
    return band


def inspect(mean_map: np.ndarray, size: int) -> Finding:
    """The finding for a cluster of `size` maps whose mean is `mean_map` (s, s)."""
    side = mean_map.shape[0]
    positive = np.clip(mean_map, 0, None)
    total = positive.sum()
    if total <= 0:
        return Finding(float("nan"), float("nan"), (0.0, 0.0, 1.0, 1.0), False, "")
    share = positive / total
    border = float(share[border_band(side)].sum())
    order = np.argsort(-share, axis=None, kind="stable")
    needed = int(np.searchsorted(np.cumsum(share.ravel()[order]), SPOT_SHARE)) + 1
    ys, xs = np.nonzero(share >= share.ravel()[order[needed - 1]])  # ties included
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    area = float((y1 - y0) * (x1 - x0)) / side**2
    region = (x0 / side, y0 / side, x1 / side, y1 / side)
    reasons = []
    if size >= MIN_SIZE and area <= SPOT_AREA:
        reasons.append(f"{SPOT_SHARE:.0%} of the relevance in {area:.1%} of the image")
    if size >= MIN_SIZE and border >= BORDER_SHARE:
        reasons.append(f"{border:.0%} of the relevance at the border")
        if area > SPOT_AREA:
            region = (0.0, 0.0, 1.0, 1.0)
    return Finding(border, area, tuple(float(v) for v in region), bool(reasons), "; ".join(reasons))
