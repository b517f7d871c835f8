"""Grid cells as pictures: an explanation map as an overlay, a heat map or its raw signed
values, each with a colour bar labelled with the map values at its two ends."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cnnscan import render
from cnnscan.attribution import Attribution

CELL_VIEWS = ("overlay", "heatmap", "raw")
SIGNED_CMAP = render.DIVERGING
_BAR_PX, _LABEL_PX, _GAP_PX = 10, 13, 3


def cell_picture(
    attr: Attribution,
    view: str,
    background: Image.Image | np.ndarray,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> np.ndarray:
    """One cell (a single-target Attribution) as uint8 RGB with its colour bar below.

    "overlay": the heat map blended over `background` (the picture as the model sees it)
    with opacity `alpha`; "heatmap": the heat map alone; "raw": the signed map (summed over
    colour channels), zero in the middle of a diverging colour map."""
    if view not in CELL_VIEWS:
        raise ValueError(f"unknown view {view!r}; use one of {CELL_VIEWS}")
    full = attr.upsample()[0, 0]
    if view == "raw":
        values = render.view(full, "signed")
        low, high = render.view_scale(full, "signed") or (0.0, 0.0)
        return with_colorbar(render.to_rgb(values, SIGNED_CMAP), SIGNED_CMAP, low, high, True)
    values = render.view(full, "heatmap")
    low, high = render.view_scale(full, "heatmap") or (0.0, 0.0)
    if view == "overlay":
        picture = render.overlay(background, values, alpha=alpha, cmap=cmap)
    else:
        picture = render.to_rgb(values, cmap)
    return with_colorbar(picture, cmap, low, high)


def with_colorbar(
    picture: np.ndarray, cmap: str, low: float, high: float, signed: bool = False
) -> np.ndarray:
    """`picture` with a colour bar of its width below it, the values `low` and `high`
    written under its ends (and 0 under the middle of a signed bar)."""
    width = picture.shape[1]
    bar = render.colorbar(width, cmap, height=_BAR_PX, signed=signed)
    strip = Image.new("RGB", (width, _LABEL_PX), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default(size=10)
    labels = [(f"{low:.3g}", "la"), (f"{high:.3g}", "ra")]
    if signed:
        labels.append(("0", "ma"))
    for text, anchor in labels:
        x = {"l": 1, "r": width - 1, "m": width // 2}[anchor[0]]
        draw.text((x, 1), text, fill=(0, 0, 0), font=font, anchor=anchor)
    gap = np.full((_GAP_PX, width, 3), 255, np.uint8)
    return np.concatenate([picture, gap, bar, np.asarray(strip)], axis=0)


def picture_png(rgb: np.ndarray) -> bytes:
    return render.png_bytes(rgb)
