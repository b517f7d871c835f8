"""Deletion / insertion curves drawn with PIL: probability (0..1) against the fraction of
pixels changed (0..1), one polyline per curve, for reports and `cnnscan evaluate`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DELETION_COLOUR = (214, 39, 40)
INSERTION_COLOUR = (31, 119, 180)
PALETTE = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (255, 127, 14),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def curves_image(
    fractions: Sequence[float],
    curves: Sequence[tuple[str, Sequence[float], tuple[int, int, int]]],
    *,
    size: tuple[int, int] = (480, 320),
    title: str = "",
    legend: bool = True,
) -> np.ndarray:
    """An RGB (H, W, 3) uint8 chart of `curves` [(label, probabilities, colour)]; `size` is
    (width, height). Small sizes leave out the text and keep the axes."""
    width, height = size
    text = width >= 240
    font = ImageFont.load_default(size=max(10, height // 24)) if text else None
    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    left, right = (44 if text else 4), width - (8 if text else 4)
    top, bottom = (24 if text and title else 8 if text else 4), height - (30 if text else 4)

    def point(x: float, y: float) -> tuple[float, float]:
        y = min(max(y, 0.0), 1.0)
        return left + x * (right - left), bottom - y * (bottom - top)

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x0, y0 = point(0, tick)
        draw.line([(x0, y0), (right, y0)], fill=(232, 232, 232))
        gx, _ = point(tick, 0)
        draw.line([(gx, top), (gx, bottom)], fill=(232, 232, 232))
        if text:
            draw.text((left - 6, y0), f"{tick:g}", fill="black", font=font, anchor="rm")
            draw.text((gx, bottom + 4), f"{tick:g}", fill="black", font=font, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline=(90, 90, 90))
    for _, values, colour in curves:
        xy = [point(float(x), float(y)) for x, y in zip(fractions, values, strict=True)]
        draw.line(xy, fill=colour, width=2 if width >= 160 else 1, joint="curve")
    if text:
        if title:
            draw.text((width / 2, 4), title, fill="black", font=font, anchor="mt")
        draw.text(
            ((left + right) / 2, height - 2),
            "fraction of pixels",
            fill="black",
            font=font,
            anchor="mb",
        )
        if legend:
            y = top + 4
            rows = max(12, height // 20)
            draw.rectangle(
                [right - 114, y - 2, right - 2, y + rows * len(curves) + 2],
                fill="white",
                outline=(200, 200, 200),
            )
            for label, _, colour in curves:
                draw.line([(right - 110, y + 6), (right - 94, y + 6)], fill=colour, width=3)
                draw.text((right - 90, y), label, fill="black", font=font)
                y += rows
    return np.asarray(picture)
