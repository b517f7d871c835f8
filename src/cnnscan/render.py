"""Pixels for people: views of attribution maps, colour maps, overlays, PNG encoding.

Views of one map (C, H, W) -- the conventions of the classic saliency papers/notebooks:
- "heatmap": (H, W) in [0, 1]; layer maps (C = 1) min-max scaled; input maps as "grayscale".
- "grayscale": Σ_c |g|, clipped at its 99th percentile, scaled to [0, 1].
- "colour": the signed map min-max scaled as one RGB image.
- "positive" / "negative": relu(±g) / max, as RGB.
- "signed": Σ_c g / max |Σ_c g|, in [-1, 1] (draw with a diverging colour map).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

VIEWS = ("heatmap", "grayscale", "colour", "positive", "negative", "signed")
_EPS = 1e-12

# Colour maps as anchor colours interpolated to 256 entries (close to matplotlib's).
_ANCHORS = {
    "inferno": [
        (0, 0, 4),
        (40, 11, 84),
        (101, 21, 110),
        (159, 42, 99),
        (212, 72, 66),
        (245, 125, 21),
        (250, 193, 39),
        (252, 255, 164),
    ],
    "viridis": [
        (68, 1, 84),
        (70, 50, 126),
        (54, 92, 141),
        (39, 127, 142),
        (31, 161, 135),
        (74, 193, 109),
        (160, 218, 57),
        (253, 231, 37),
    ],
    "jet": [
        (0, 0, 128),
        (0, 0, 255),
        (0, 128, 255),
        (0, 255, 255),
        (128, 255, 128),
        (255, 255, 0),
        (255, 128, 0),
        (255, 0, 0),
        (128, 0, 0),
    ],
    "coolwarm": [(59, 76, 192), (141, 176, 254), (221, 221, 221), (244, 154, 123), (180, 4, 38)],
    "gray": [(0, 0, 0), (255, 255, 255)],
}
COLORMAPS = tuple(_ANCHORS)


def _lut(name: str) -> np.ndarray:
    if name not in _ANCHORS:
        raise ValueError(f"unknown colour map {name!r}; use one of {COLORMAPS}")
    anchors = np.asarray(_ANCHORS[name], dtype=np.float64)
    positions = np.linspace(0, 1, len(anchors))
    grid = np.linspace(0, 1, 256)
    lut = np.stack([np.interp(grid, positions, anchors[:, c]) for c in range(3)], axis=1)
    return lut.round().astype(np.uint8)


def view(map_: torch.Tensor, kind: str = "heatmap") -> torch.Tensor:
    """One map (C, H, W) -> (H, W) or (3, H, W) values for display (see module docstring)."""
    map_ = map_.detach().float()
    if kind == "heatmap":
        if map_.shape[0] == 1:
            return _minmax(map_[0])
        kind = "grayscale"
    if kind == "grayscale":
        magnitude = map_.abs().sum(dim=0)
        top = torch.quantile(magnitude.flatten()[:16_000_000], 0.99)
        return (magnitude / top.clamp_min(_EPS)).clamp(0, 1)
    if kind == "colour":
        return _minmax(map_)
    if kind in ("positive", "negative"):
        part = (map_ if kind == "positive" else -map_).clamp_min(0)
        return part / part.max().clamp_min(_EPS)
    if kind == "signed":
        total = map_.sum(dim=0)
        return total / total.abs().max().clamp_min(_EPS)
    raise ValueError(f"unknown view {kind!r}; use one of {VIEWS}")


def _minmax(x: torch.Tensor) -> torch.Tensor:
    low, high = x.min(), x.max()
    return (x - low) / (high - low).clamp_min(_EPS)


def to_rgb(values: torch.Tensor | np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """Display values -> uint8 RGB (H, W, 3). (H, W) in [0, 1] or [-1, 1] (signed, use a
    diverging map) goes through `cmap`; (3, H, W) in [0, 1] is shown as colour directly."""
    values = torch.as_tensor(values).detach().float().cpu()
    if values.ndim == 3:
        return (values.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    if float(values.min()) < 0:
        values = (values + 1) / 2
    index = (values.clamp(0, 1) * 255).round().long().numpy()
    return _lut(cmap)[index]


def overlay(
    image: np.ndarray | Image.Image, heat: torch.Tensor, alpha: float = 0.5, cmap: str = "jet"
) -> np.ndarray:
    """Blend a (H, W) heat map in [0, 1] over an RGB image of the same size (uint8)."""
    base = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    heat = torch.as_tensor(heat).detach().float().cpu()
    if heat.shape != base.shape[:2]:
        raise ValueError(f"heat map {tuple(heat.shape)} and image {base.shape[:2]} differ in size")
    colour = to_rgb(heat, cmap).astype(np.float32)
    mixed = (1 - alpha) * base.astype(np.float32) + alpha * colour
    return mixed.clip(0, 255).round().astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode a uint8 (H, W, 3) or (H, W) array as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
