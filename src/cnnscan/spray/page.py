"""audit.html: per class, the t-SNE picture of its maps coloured by cluster and, per cluster,
its size, accuracy and mean confidence, its mean map (with the suspicious region drawn) and
example images with their maps over them; next to it the tables as Parquet files."""

from __future__ import annotations

import datetime as dt
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import numpy as np
import torch
from PIL import Image, ImageDraw

from cnnscan import render
from cnnscan.attribution import resize_maps
from cnnscan.errors import CnnscanError
from cnnscan.images import load_image
from cnnscan.metrics.relevance import reduce_channels
from cnnscan.report_pictures import data_uri

if TYPE_CHECKING:
    from cnnscan.spray.run import Audit

PICTURE_PX = 160
SCATTER_PX = 320
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip
REGION_COLOUR = (0, 255, 255)


def write_page(found: Audit, out: Path, model: Any = None, examples: int = 6) -> Path:
    """Write out/audit.html and out/{classes,clusters,members}.parquet; returns the page."""
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    for name in ("classes", "clusters", "members"):
        pq.write_table(getattr(found, name), out / f"{name}.parquet")
    members = found.members.to_pylist()
    clusters = found.clusters.to_pylist()
    sections = []
    for info in found.classes.to_pylist():
        mine = [m for m in members if m["class_id"] == info["class_id"]]
        cells = []
        for row in (c for c in clusters if c["class_id"] == info["class_id"]):
            inside = [m for m in mine if m["cluster"] == row["cluster"]]
            mean = found.mean_maps[(info["class_id"], row["cluster"])]
            cells.append(
                {
                    **row,
                    "colour": "rgb{}".format(PALETTE[row["cluster"] % len(PALETTE)]),
                    "mean_uri": data_uri(_mean_picture(mean, row), lossless=True),
                    "examples": [data_uri(_example(found, m, model)) for m in inside[:examples]],
                }
            )
        sections.append({**info, "scatter_uri": data_uri(_scatter(mine), True), "cells": cells})
    text = _template().render(
        sections=sections,
        method=found.method,
        source=str(found.results.out),
        model=found.results.settings.get("model"),
        generated=dt.datetime.now().isoformat(timespec="seconds"),
    )
    page = out / "audit.html"
    page.write_text(text, encoding="utf-8")
    return page


def _mean_picture(mean: np.ndarray, row: dict) -> np.ndarray:
    """The mean map (positive part, scaled to its maximum) in inferno, enlarged, with the
    suspicious region outlined."""
    positive = np.clip(mean, 0, None)
    top = positive.max()
    rgb = render.to_rgb(positive / top if top > 0 else positive, "inferno")
    picture = Image.fromarray(rgb).resize((PICTURE_PX, PICTURE_PX), Image.Resampling.NEAREST)
    if row["suspicious"]:
        box = [row[k] * PICTURE_PX for k in ("region_x0", "region_y0", "region_x1", "region_y1")]
        ImageDraw.Draw(picture).rectangle(
            [box[0], box[1], box[2] - 1, box[3] - 1], outline=REGION_COLOUR, width=3
        )
    return np.asarray(picture)


def _example(found: Audit, member: dict, model: Any) -> np.ndarray:
    """The image as the model saw it (or squeezed to a square without the model) with the
    map's relevance over it; a grey square if the file can no longer be read."""
    try:
        picture = load_image(member["path"])
    except CnnscanError:
        return np.full((PICTURE_PX, PICTURE_PX, 3), 128, dtype=np.uint8)
    if model is not None:
        picture = model.preprocessing.view(picture)
    picture = picture.resize((PICTURE_PX, PICTURE_PX), Image.Resampling.BILINEAR)
    stored = torch.from_numpy(found.results.array(member)).float().unsqueeze(0)
    heat = resize_maps(reduce_channels(stored).unsqueeze(0), (PICTURE_PX, PICTURE_PX))[0, 0, 0]
    return render.overlay(picture, render.minmax(heat))


def _scatter(members: list[dict]) -> np.ndarray:
    """The t-SNE positions as dots coloured by cluster."""
    canvas = Image.new("RGB", (SCATTER_PX, SCATTER_PX), "white")
    placed = [m for m in members if m["x"] is not None]
    if placed:
        xy = np.array([[m["x"], m["y"]] for m in placed])
        low, span = xy.min(axis=0), np.maximum(np.ptp(xy, axis=0), 1e-12)
        scaled = 8 + (xy - low) / span * (SCATTER_PX - 16)
        draw = ImageDraw.Draw(canvas)
        for (x, y), m in zip(scaled, placed, strict=True):
            colour = PALETTE[m["cluster"] % len(PALETTE)]
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    return np.asarray(canvas)


def _template() -> jinja2.Template:
    text = resources.files("cnnscan").joinpath("templates/audit.html.j2").read_text("utf-8")
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(text)
