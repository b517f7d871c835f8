"""Pixels for people: views of attribution maps, colour maps, overlays, picture encoding.

Views of one map (C, H, W), each scaled robustly: a map's colour scale ends at its
`clip_value` (captum's visualization convention: the |value| below which the map holds
100 − `OUTLIER_PERC` % of its total |value|), so a few outlier pixels cannot turn the rest
of the map into one flat colour; values beyond it are clipped.
- "heatmap": (H, W) in [0, 1]; layer maps (C = 1) min-max scaled (the CAM convention);
  input maps as "grayscale".
- "grayscale": Σ_c |a|, scaled to [0, 1].
- "signed": Σ_c a in [-1, 1], zero in the middle (draw with the diverging `DIVERGING`).
- "colour": the signed map as one RGB image, each channel 0.5 + a / 2t (zero is grey).
- "positive" / "negative": relu(±a) as RGB in [0, 1].
"""

from __future__ import annotations

import functools
import io

import numpy as np
import torch
from PIL import Image

from cnnscan.choices import FILTER_MODES, SCALES, VIEWS

# captum's `outlier_perc`, above its default of 2: at 2 % a sparse map (guided backprop on a
# photo with plain sky) stays white but for a few dots (luminance std 7-9 of 255, measured);
# at 10 % it reads, and 0.3-2 % of the pixels of the default scan's maps saturate.
OUTLIER_PERC = 10.0

_EPS = 1e-12

# Colour maps as anchor colours interpolated to `LUT_SIZE` entries (close to matplotlib's).
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
    # ColorBrewer's RdBu reversed: negative blue, zero near-white, positive red.
    "rdbu": [
        (5, 48, 97),
        (33, 102, 172),
        (67, 147, 195),
        (146, 197, 222),
        (209, 229, 240),
        (247, 247, 247),
        (253, 219, 199),
        (244, 165, 130),
        (214, 96, 77),
        (178, 24, 43),
        (103, 0, 31),
    ],
    "gray": [(0, 0, 0), (255, 255, 255)],
}
COLORMAPS = tuple(_ANCHORS)
DIVERGING = "rdbu"  # signed maps
SEQUENTIAL = "inferno"  # magnitudes of input-space maps
LUT_SIZE = 257  # odd: the middle entry is exactly a diverging map's centre colour


@functools.cache
def _lut(name: str) -> np.ndarray:
    if name not in _ANCHORS:
        raise ValueError(f"unknown colour map {name!r}; use one of {COLORMAPS}")
    anchors = np.asarray(_ANCHORS[name], dtype=np.float64)
    positions = np.linspace(0, 1, len(anchors))
    grid = np.linspace(0, 1, LUT_SIZE)
    lut = np.stack([np.interp(grid, positions, anchors[:, c]) for c in range(3)], axis=1)
    lut = lut.round().astype(np.uint8)
    lut.flags.writeable = False
    return lut


def clip_value(values: np.ndarray | torch.Tensor, outlier_perc: float = OUTLIER_PERC) -> float:
    """Where a map's colour scale ends: the smallest |value| at which the sorted |values|
    add up to (100 − `outlier_perc`) % of their total (captum.attr.visualization's
    `_cumulative_sum_threshold`); 0 for an all-zero map."""
    magnitude = np.sort(np.abs(_numpy(values)).ravel())
    total = np.cumsum(magnitude, dtype=np.float64)
    if total.size == 0 or total[-1] <= 0:
        return 0.0
    index = int(np.searchsorted(total, total[-1] * 0.01 * (100.0 - outlier_perc)))
    return float(magnitude[min(index, magnitude.size - 1)])


def _numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    """float32 numpy values (rendering runs in numpy: one thread, no torch dispatch)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float32)


def _scaled(values: np.ndarray, top: float, low: float) -> np.ndarray:
    """values / top clipped to [low, 1] (all zeros when top is 0)."""
    if top <= 0:
        return np.zeros_like(values)
    return np.clip(values / np.float32(top), low, 1.0)


def scaled_view(
    map_: np.ndarray | torch.Tensor, kind: str = "heatmap"
) -> tuple[np.ndarray, tuple[float, float]]:
    """One map (C, H, W) -> (display values, (low, high)): the values of `view` as float32
    numpy and the raw map values at the two ends of their scale (for a colour bar's
    labels). For the RGB views the scale is per channel: "colour" (−t, t) with grey at 0,
    "positive" (0, t), "negative" (−t, 0) with black at 0."""
    values = _numpy(map_)
    if kind == "heatmap" and values.shape[0] == 1:
        low, high = float(values.min()), float(values.max())
        span = high - low
        shown = (values[0] - low) / span if span > 0 else np.zeros_like(values[0])
        return shown, (low, high)
    if kind in ("heatmap", "grayscale"):
        magnitude = np.abs(values).sum(axis=0)
        top = clip_value(magnitude)
        return _scaled(magnitude, top, 0.0), (0.0, top)
    if kind == "signed":
        total = values.sum(axis=0)
        top = clip_value(total)
        return _scaled(total, top, -1.0), (-top, top)
    if kind == "colour":
        top = clip_value(values)
        return 0.5 + 0.5 * _scaled(values, top, -1.0), (-top, top)
    if kind in ("positive", "negative"):
        part = np.maximum(values if kind == "positive" else -values, 0)
        top = clip_value(part)
        return _scaled(part, top, 0.0), (0.0, top) if kind == "positive" else (-top, 0.0)
    raise ValueError(f"unknown view {kind!r}; use one of {VIEWS}")


def view(map_: torch.Tensor, kind: str = "heatmap") -> torch.Tensor:
    """One map (C, H, W) -> (H, W) or (3, H, W) values for display (see module docstring)."""
    return torch.from_numpy(scaled_view(map_, kind)[0])


def minmax(x: torch.Tensor) -> torch.Tensor:
    low, high = x.min(), x.max()
    return (x - low) / (high - low).clamp_min(_EPS)


def to_rgb(values: torch.Tensor | np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """Display values -> uint8 RGB (H, W, 3). (H, W) in [0, 1] or [-1, 1] (signed, use a
    diverging map) goes through `cmap`; (3, H, W) in [0, 1] is shown as colour directly."""
    values = _numpy(values)
    if values.ndim == 3:
        return (np.clip(values.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
    if values.size and float(values.min()) < 0:
        values = (values + 1) / 2
    return _colour(values, cmap)


def _colour(values: np.ndarray, cmap: str) -> np.ndarray:
    """Values in [0, 1] of any shape -> uint8 RGB (..., 3) through the colour map."""
    index = np.rint(np.clip(values, 0, 1) * (LUT_SIZE - 1)).astype(np.intp)
    return _lut(cmap)[index]


def overlay(
    image: np.ndarray | Image.Image, heat: torch.Tensor, alpha: float = 0.5, cmap: str = "jet"
) -> np.ndarray:
    """Blend a (H, W) heat map in [0, 1] over an RGB image of the same size (uint8)."""
    base = _picture(image, heat)
    colour = to_rgb(heat, cmap).astype(np.float32)
    mixed = (1 - alpha) * base.astype(np.float32) + alpha * colour
    return mixed.clip(0, 255).round().astype(np.uint8)


WASH = 0.5  # how much of the picture's contrast a faded overlay keeps


def faded_overlay(
    image: np.ndarray | Image.Image,
    values: torch.Tensor | np.ndarray,
    cmap: str = DIVERGING,
    *,
    signed: bool = True,
) -> np.ndarray:
    """A sparse map over the picture (uint8): the picture in washed-out grey, each pixel
    tinted with the map's colour by the weight √|v| (v in [−1, 1] when `signed`, else
    [0, 1]), so near-zero values leave the picture visible and strong ones cover it. For
    input-space maps, which are near zero almost everywhere; CAMs use `overlay`."""
    base = _picture(image, values).astype(np.float32)
    grey = base @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    washed = (255 - WASH * (255 - grey))[..., None]
    values = _numpy(values)
    colour = _colour((values + 1) / 2 if signed else values, cmap).astype(np.float32)
    weight = np.sqrt(np.clip(np.abs(values), 0, 1))[..., None]
    mixed = (1 - weight) * washed + weight * colour
    return mixed.clip(0, 255).round().astype(np.uint8)


def _picture(image: np.ndarray | Image.Image, values: torch.Tensor | np.ndarray) -> np.ndarray:
    """The RGB picture under an overlay, checked to match the map's (H, W)."""
    base = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if tuple(values.shape) != base.shape[:2]:
        raise ValueError(
            f"heat map {tuple(values.shape)} and image {base.shape[:2]} differ in size"
        )
    return base


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode a uint8 (H, W, 3) or (H, W) array as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def webp_bytes(rgb: np.ndarray, quality: int = 80) -> bytes:
    """Encode a uint8 (H, W, 3) array as lossy WebP: a tenth of a PNG's size for photos and
    smooth maps, for pictures that are looked at rather than measured (the raw maps are
    saved as numbers)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(
        buffer, format="WEBP", quality=quality, method=0
    )
    return buffer.getvalue()


def terminal_picture(rgb: np.ndarray, columns: int = 48) -> str:
    """A picture for a colour terminal: two pixel rows per text row ("▀" with a 24-bit
    foreground for the upper pixel and background for the lower), `columns` wide."""
    height = max(2, round(rgb.shape[0] * columns / rgb.shape[1] / 2) * 2)
    small = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((columns, height)))
    lines = []
    for top, bottom in zip(small[0::2], small[1::2], strict=True):
        cells = (
            f"\x1b[38;2;{a[0]};{a[1]};{a[2]}m\x1b[48;2;{b[0]};{b[1]};{b[2]}m▀"
            for a, b in zip(top, bottom, strict=True)
        )
        lines.append("".join(cells) + "\x1b[0m")
    return "\n".join(lines)


# -- grids of small pictures: filters and feature maps ---------------------------------------------


def _minmax_each(x: torch.Tensor) -> torch.Tensor:
    """Min-max scale each x[i] to [0, 1] on its own (a constant x[i] becomes 0)."""
    flat = x.detach().float().flatten(1)
    low = flat.amin(dim=1).view(-1, *[1] * (x.ndim - 1))
    high = flat.amax(dim=1).view(-1, *[1] * (x.ndim - 1))
    return (x.float() - low) / (high - low).clamp_min(_EPS)


def enlarge(tiles: np.ndarray, tile_px: int) -> np.ndarray:
    """(n, h, w, 3) uint8 tiles scaled so the longer side is about `tile_px`: integer nearest
    upscaling keeps every weight/unit a crisp block; larger tiles are box-filtered down."""
    h, w = tiles.shape[1:3]
    if max(h, w) <= tile_px:
        factor = max(1, tile_px // max(h, w))
        return tiles.repeat(factor, axis=1).repeat(factor, axis=2)
    scale = tile_px / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.stack(
        [np.asarray(Image.fromarray(t).resize(size, Image.Resampling.BOX)) for t in tiles]
    )


def tile_grid(
    tiles: np.ndarray,
    columns: int | None = None,
    *,
    labels: list[str] | None = None,
    pad: int = 2,
    background: int = 255,
) -> np.ndarray:
    """Lay out uint8 tiles (n, h, w, 3) row by row, `columns` per row (default ≈ √n), `pad`
    pixels apart, each with its label (if given) written above it: one uint8 RGB picture."""
    from PIL import ImageDraw, ImageFont

    n, h, w, _ = tiles.shape
    if n == 0:
        raise ValueError("no tiles to lay out")
    columns = max(1, min(n, columns or int(np.ceil(np.sqrt(n)))))
    rows = int(np.ceil(n / columns))
    label_h = 12 if labels else 0
    cell_h, cell_w = h + label_h + pad, w + pad
    canvas = np.full((rows * cell_h + pad, columns * cell_w + pad, 3), background, np.uint8)
    for i in range(n):
        top = (i // columns) * cell_h + pad + label_h
        left = (i % columns) * cell_w + pad
        canvas[top : top + h, left : left + w] = tiles[i]
    if labels:
        picture = Image.fromarray(canvas)
        draw = ImageDraw.Draw(picture)
        font = ImageFont.load_default(size=10)
        for i, label in enumerate(labels[:n]):
            top = (i // columns) * cell_h + pad
            left = (i % columns) * cell_w + pad
            draw.text((left, top), label, fill=(0, 0, 0), font=font)
        canvas = np.asarray(picture)
    return canvas


def filter_grid(
    weights: torch.Tensor,
    mode: str = "auto",
    *,
    max_filters: int | None = 64,
    max_channels: int | None = 32,
    tile_px: int = 32,
    labels: bool = True,
) -> np.ndarray:
    """A picture of convolution filters `weights` (out, in, kh, kw), min-max scaled per filter.

    "rgb": one colour tile per filter (needs 3 input channels: the first layer);
    "mean": one grey tile per filter, averaged over its input channels;
    "channels": one row per filter, one grey tile per input channel;
    "auto": "rgb" for 3 input channels, else "channels".
    At most `max_filters` filters (and `max_channels` input channels) are drawn, the first ones.
    """
    if weights.ndim != 4:
        raise ValueError(f"filters must be (out, in, kh, kw), got shape {tuple(weights.shape)}")
    if mode not in FILTER_MODES:
        raise ValueError(f"unknown filter mode {mode!r}; use one of {FILTER_MODES}")
    weights = weights.detach().float().cpu()
    out_ch, in_ch = weights.shape[:2]
    if mode == "auto":
        mode = "rgb" if in_ch == 3 else "channels"
    if mode == "rgb" and in_ch != 3:
        raise ValueError(
            f"mode 'rgb' needs filters with 3 input channels; these have {in_ch}: "
            "use mode 'channels' or 'mean'"
        )
    shown = weights[: max_filters or out_ch]
    scaled = _minmax_each(shown)  # per filter, over all of its input channels
    if mode == "rgb":
        tiles = (scaled.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
        names = [str(i) for i in range(len(shown))]
        columns = None
    elif mode == "mean":
        tiles = _grey(_minmax_each(shown.mean(dim=1)))
        names = [str(i) for i in range(len(shown))]
        columns = None
    elif in_ch == 1:  # depthwise: one channel per filter, laid out like "mean"
        tiles = _grey(scaled[:, 0])
        names = [str(i) for i in range(len(shown))]
        columns = None
    else:
        scaled = scaled[:, : max_channels or in_ch]
        columns = scaled.shape[1]
        tiles = _grey(scaled.flatten(0, 1))
        names = [str(i) if c == 0 else "" for i in range(len(shown)) for c in range(columns)]
    return tile_grid(enlarge(tiles, tile_px), columns, labels=names if labels else None)


def _grey(values: torch.Tensor) -> np.ndarray:
    """(n, h, w) in [0, 1] -> (n, h, w, 3) uint8 grey tiles."""
    grey = (values.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return np.repeat(grey[..., None], 3, axis=-1)


def feature_grid(
    maps: torch.Tensor,
    channels: torch.Tensor | list[int] | None = None,
    *,
    scale: str = "shared",
    cmap: str = "viridis",
    tile_px: int = 64,
    labels: bool = True,
) -> np.ndarray:
    """A picture of the feature maps (C, H, W) of one image: the given `channels` (default
    all), each tile labelled with its channel index. `scale="shared"` maps one value range
    over all shown maps (compare strengths), "per-map" min-max scales each map (see shapes)."""
    if maps.ndim != 3:
        raise ValueError(f"feature maps must be (C, H, W), got shape {tuple(maps.shape)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; use one of {SCALES}")
    index = torch.arange(len(maps)) if channels is None else torch.as_tensor(channels).cpu()
    if index.numel() == 0:
        raise ValueError("no channels to show")
    bad = index[(index < 0) | (index >= len(maps))]
    if bad.numel():
        raise ValueError(
            f"channel {int(bad[0])} is out of range: the maps have {len(maps)} (0..{len(maps) - 1})"
        )
    values = maps.detach().float().cpu()[index]
    values = _minmax_each(values) if scale == "per-map" else minmax(values)
    tiles = _colour(values.numpy(), cmap)
    names = [str(int(i)) for i in index] if labels else None
    return tile_grid(enlarge(tiles, tile_px), labels=names)


# -- colour bars --------------------------------------------------------------------------------
def view_scale(map_: torch.Tensor, kind: str = "heatmap") -> tuple[float, float]:
    """The raw map values that `view(map_, kind)` puts at the two ends of its colour scale
    (for a colour bar's labels; see `scaled_view`)."""
    return scaled_view(map_, kind)[1]


def colorbar(
    width: int, cmap: str = "jet", *, height: int = 10, signed: bool = False
) -> np.ndarray:
    """A horizontal colour bar (height, width, 3) uint8: `cmap` from its low end on the left
    to its high end on the right (`signed`: the values -1..1 of a diverging view)."""
    ramp = np.linspace(-1.0 if signed else 0.0, 1.0, max(1, width), dtype=np.float32)
    return to_rgb(np.broadcast_to(ramp, (height, ramp.size)), cmap)


def css_gradient(cmap: str, stops: int = 17) -> str:
    """The colour map as a CSS `linear-gradient` from its low end (left) to its high end:
    a colour bar drawn by the browser, crisp at any width and no bytes of picture."""
    lut = _lut(cmap)
    index = np.linspace(0, LUT_SIZE - 1, stops).round().astype(int)
    parts = [
        f"rgb({r},{g},{b}) {100 * i / (LUT_SIZE - 1):.1f}%"
        for i, (r, g, b) in zip(index, lut[index], strict=True)
    ]
    return f"linear-gradient(to right, {', '.join(parts)})"
