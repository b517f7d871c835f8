"""The report's pictures: each map drawn alone and over the photo, the ends of its colour
scale and the notes under it, encoded small enough that a whole scan fits in one page.

How a map is drawn: a layer map (a CAM) is min-max scaled and drawn in "jet", alone and
over the photo (the CAM libraries' convention); an input-space map is scaled robustly
(`cnnscan.render.clip_value`) and drawn as its magnitude in `render.SEQUENTIAL`, or, for
the methods whose usual view is signed (guided backprop, DeconvNet, guided Grad-CAM,
LRP), as Σ_c a on the diverging `render.DIVERGING` centred at zero; over the photo it is
`render.faded_overlay`. A map's pictures are WebP at `CELL_PX` (the raw maps are saved as
numbers beside the report); line art and pixel grids stay PNG.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from cnnscan import render
from cnnscan.attribution import Attribution
from cnnscan.metrics.completeness import COMPLETENESS_TOLERANCE, completeness_error

CELL_PX = 192  # a map's pictures are embedded this size: about the size a cell is shown at
WEBP_QUALITY = 70  # a noisy 192-px gradient map in ~13 kB
LAYER_CMAP = "jet"
SIGNED_VIEWS = ("signed", "colour")  # usual views whose sign the report keeps
VIEW_KINDS = ("signed", "grayscale", "positive", "negative")  # the top-1 views section
VIEW_CMAPS = {"signed": render.DIVERGING, "grayscale": "gray"}  # the others are RGB


def data_uri(rgb: np.ndarray, lossless: bool = False) -> str:
    """A picture as a data: URI: WebP, or PNG when `lossless` (line art, grids of tiles,
    pictures a test or a reader compares pixel by pixel)."""
    if lossless:
        return "data:image/png;base64," + base64.b64encode(render.png_bytes(rgb)).decode()
    encoded = render.webp_bytes(rgb, quality=WEBP_QUALITY)
    return "data:image/webp;base64," + base64.b64encode(encoded).decode()


def cell_uri(rgb: np.ndarray) -> str:
    """A map's picture as the report embeds it: scaled to `CELL_PX` (box filter), WebP."""
    if max(rgb.shape[:2]) != CELL_PX:
        rgb = np.asarray(Image.fromarray(rgb).resize(_cell_size(rgb), Image.Resampling.BOX))
    return data_uri(rgb)


def _cell_size(rgb: np.ndarray) -> tuple[int, int]:
    """(width, height) with the longer side `CELL_PX`, the aspect kept."""
    h, w = rgb.shape[:2]
    scale = CELL_PX / max(h, w)
    return max(1, round(w * scale)), max(1, round(h * scale))


def scale_labels(low: float, high: float, signed: bool) -> list[str]:
    """The numbers under a colour bar: its two ends, and 0 in the middle of a signed one."""
    return [f"{low:.2g}", "0", f"{high:.2g}"] if signed else [f"{low:.2g}", f"{high:.2g}"]


@dataclass
class MapCell:
    """One method's map of one class as the report shows it."""

    method: str
    alt: str
    usual: str = "map"  # the picture shown first: "map" or "overlay"
    map_uri: str = ""
    overlay_uri: str = ""
    cmap: str = LAYER_CMAP
    scale: list[str] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.map_uri


def map_cells(attr: Attribution, background: np.ndarray, labels: list[str]) -> list[MapCell]:
    """The cells of `attr`'s maps of image 0, one per target (labelled by `labels`), over
    `background` (the picture the model saw, (H, W, 3) uint8)."""
    full = attr.upsample()[0]  # every target at once: one resize per method
    return [
        map_cell(attr, t, full[t], background, f"{attr.method} for {label}")
        for t, label in enumerate(labels)
    ]


def map_cell(
    attr: Attribution, target: int, full: torch.Tensor, background: np.ndarray, alt: str
) -> MapCell:
    """The cell of the map `full` (C, H, W, at the input's resolution) of `attr`'s target
    column `target`."""
    cell = MapCell(attr.method, alt, notes=map_notes(attr, target))
    layer = (attr.space or ("layer" if full.shape[0] == 1 else "input")) == "layer"
    signed = not layer and attr.default_view in SIGNED_VIEWS
    values, (low, high) = render.scaled_view(full, "signed" if signed else "heatmap")
    if low == high:
        cell.notes.insert(0, {"text": "the map is zero everywhere for this class", "warn": True})
        return cell
    if layer:
        cell.usual = "overlay"
        cell.map_uri = cell_uri(render.to_rgb(values, LAYER_CMAP))
        cell.overlay_uri = cell_uri(render.overlay(background, values, cmap=LAYER_CMAP))
    else:
        cell.cmap = render.DIVERGING if signed else render.SEQUENTIAL
        coloured = render.to_rgb((values + 1) / 2 if signed else values, cell.cmap)
        cell.map_uri = cell_uri(coloured)
        faded = render.faded_overlay(background, values, cell.cmap, signed=signed)
        cell.overlay_uri = cell_uri(faded)
    cell.scale = scale_labels(low, high, signed)
    return cell


def map_notes(attr: Attribution, target: int | None = None) -> list[dict[str, Any]]:
    """The notes under a map: its completeness error (for `target`, or the worst over the
    targets when None), a warning when it is above `COMPLETENESS_TOLERANCE`, what LRP's
    relevance sums to, and any warning the method gave."""
    notes = []
    counts = [
        (attr.extras.get(key), unit)
        for key, unit in (("n_steps", "steps"), ("n_samples", "samples"))
    ]
    notes += [{"text": f"{n} {unit}", "warn": False} for n, unit in counts if isinstance(n, int)]
    error = completeness_error(attr)
    if error is not None:
        value = float(error[0].max() if target is None else error[0, target])
        worst = "≤ " if target is None else ""
        warn = value > COMPLETENESS_TOLERANCE
        text = f"completeness error {worst}{value:.2%}"
        if warn:
            text = f"⚠ {text}: above {COMPLETENESS_TOLERANCE:.0%}, the map does not add up"
        notes.append({"text": text, "warn": warn})
    totals = attr.extras.get("relevance_sum")  # LRP: what its rules hand down to the pixels
    if isinstance(totals, torch.Tensor) and attr.scores is not None:
        t = 0 if target is None else target
        share = float(totals[0, t] / attr.scores[0, t])
        biases = "left out" if attr.extras.get("zero_params") == "bias" else "included"
        notes.append(
            {
                "text": f"relevance sums to {share:.1%} of the target logit "
                f"({attr.extras.get('composite')}, biases {biases}): the rest is absorbed by "
                "the rules, not an error in the map",
                "warn": False,
            }
        )
    if "warning" in attr.extras:
        notes.append({"text": f"⚠ {attr.extras['warning']}", "warn": True})
    return notes


@dataclass
class ViewCell:
    """One classic view of a top-1 map (see `VIEW_KINDS`)."""

    title: str
    uri: str
    cmap: str | None  # None: an RGB view, no colour bar
    scale: list[str]


def view_cells(attr: Attribution) -> list[ViewCell]:
    """The signed, magnitude, positive and negative views of `attr`'s first map; a view
    with nothing to show (a map without negative values) is left out."""
    full = attr.full_map(0, 0)
    cells = []
    for kind in VIEW_KINDS:
        values, (low, high) = render.scaled_view(full, kind)
        if low == high:
            continue
        cmap = VIEW_CMAPS.get(kind)
        signed = kind == "signed"
        rgb = render.to_rgb((values + 1) / 2 if signed else values, cmap or "gray")
        scale = scale_labels(low, high, signed)
        cells.append(ViewCell(f"{attr.method} · {kind}", cell_uri(rgb), cmap, scale))
    return cells
