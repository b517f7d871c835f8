"""Rich display in Jupyter: attributions, prediction tables and filter / feature-map grids
show themselves as pictures and tables (`_repr_html_` / `_repr_png_`), no plotting code."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnscan import render

if TYPE_CHECKING:
    from cnnscan.attribution import Attribution

MAX_TILES = 64  # an attribution's picture shows at most this many (image, target) maps
TILE_PX = 160


def _b64_png(rgb: np.ndarray) -> str:
    return base64.b64encode(render.png_bytes(rgb)).decode("ascii")


def _img_tag(rgb: np.ndarray, alt: str) -> str:
    return f'<img src="data:image/png;base64,{_b64_png(rgb)}" alt="{html.escape(alt)}"/>'


@dataclass
class Picture:
    """A uint8 RGB picture (H, W, 3) with a title; shows itself in Jupyter and saves as PNG."""

    pixels: np.ndarray
    title: str = ""

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.pixels if dtype is None else self.pixels.astype(dtype)

    def png(self) -> bytes:
        """The picture encoded as PNG."""
        return render.png_bytes(self.pixels)

    def save(self, path: str | Path) -> Path:
        """Write the picture as a PNG file; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.png())
        return path

    def _repr_png_(self) -> bytes:
        return self.png()

    def _repr_html_(self) -> str:
        caption = f"<figcaption>{html.escape(self.title)}</figcaption>" if self.title else ""
        return f'<figure class="cnnscan">{_img_tag(self.pixels, self.title)}{caption}</figure>'


# -- attribution maps ------------------------------------------------------------------------------
def background(attr: Attribution, image: int = 0) -> np.ndarray:
    """The picture the model saw for `image` of an attribution, uint8 (H, W, 3): the inputs
    un-normalized with the model's preprocessing, or min-max scaled if it is unknown."""
    x = attr.inputs[image].detach().float().cpu()
    prep = attr.preprocessing
    pixels = prep.denormalize(x[None])[0] if prep is not None else render.minmax(x)
    return render.to_rgb(pixels.clamp(0, 1))


def map_picture(attr: Attribution, image: int, target: int, back: np.ndarray) -> np.ndarray:
    """One map drawn as the report draws it: layer heat maps over the picture, input-space
    maps in the method's own view (`Attribution.default_view`)."""
    space = attr.space or ("layer" if attr.maps.shape[2] == 1 else "input")
    kind = attr.default_view
    if kind == "heatmap" and space == "layer":
        return attr.image(image, target, "heatmap", background=back)
    return attr.image(image, target, kind)


def _fit(rgb: np.ndarray, px: int) -> np.ndarray:
    """Scale a picture so its longer side is `px` (pixels kept crisp when enlarged)."""
    return render.enlarge(rgb[None], px)[0] if max(rgb.shape[:2]) != px else rgb


def _caption(attr: Attribution, image: int, target: int, short: bool = True) -> str:
    """ "id name (score)"; the long form says that the score is the target's logit."""
    text = attr.label(image, target)
    if attr.scores is not None:
        score = float(attr.scores[image, target])
        text += f" ({score:.3g})" if short else f", logit {score:.4g}"
    return text


def _pairs(attr: Attribution) -> list[tuple[int, int]]:
    n, t = attr.targets.shape
    return [(i, j) for i in range(n) for j in range(t)][:MAX_TILES]


def attribution_png(attr: Attribution, tile_px: int = TILE_PX) -> bytes:
    """A grid with one row per image and one tile per target, each labelled "id name (score)"."""
    pairs = _pairs(attr)
    backs = {i: background(attr, i) for i in {i for i, _ in pairs}}
    tiles = np.stack([_fit(map_picture(attr, i, t, backs[i]), tile_px) for i, t in pairs])
    chars = max(8, tile_px // 6)  # the label font is about 6 px per character
    labels = [_caption(attr, i, t)[:chars] for i, t in pairs]
    return render.png_bytes(render.tile_grid(tiles, attr.targets.shape[1], labels=labels))


def attribution_html(attr: Attribution, tile_px: int = TILE_PX) -> str:
    """A table: a header naming the method and layer, one row per image, one cell per target
    with its picture and its label and score; scalar extras listed below."""
    pairs = _pairs(attr)
    n, t = attr.targets.shape
    where = f" at layer <code>{html.escape(attr.layer)}</code>" if attr.layer else ""
    shape = "×".join(map(str, attr.maps.shape))
    head = (
        f"<p><b>{html.escape(attr.method)}</b>{where}: maps {shape} "
        "(images × targets × channels × h × w)</p>"
    )
    rows = []
    for i in sorted({i for i, _ in pairs}):
        back = background(attr, i)
        cells = []
        for _, j in (p for p in pairs if p[0] == i):
            caption = html.escape(_caption(attr, i, j, short=False))
            picture = _img_tag(_fit(map_picture(attr, i, j, back), tile_px), caption)
            cells.append(f"<td>{picture}<br/>{caption}</td>")
        rows.append(f"<tr><th>image {i}</th>{''.join(cells)}</tr>")
    more = f"<p>first {len(pairs)} of {n * t} maps shown</p>" if len(pairs) < n * t else ""
    table = f"<table>{''.join(rows)}</table>"
    return f'<div class="cnnscan">{head}{table}{more}{_extras_html(attr)}</div>'


def _extras_html(attr: Attribution) -> str:
    items = []
    for key, value in attr.summary()["extras"].items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, list):  # (N, T) numbers: show them compactly
            flat = np.asarray(value, dtype=object).ravel()
            if len(flat) > 8 or not all(isinstance(v, int | float) for v in flat):
                continue
            value = ", ".join(f"{float(v):.4g}" for v in flat)
        items.append(f"<li><code>{html.escape(key)}</code>: {html.escape(str(value))}</li>")
    return f"<ul>{''.join(items)}</ul>" if items else ""


# -- prediction tables -----------------------------------------------------------------------------
class Predictions(list):
    """Top-k predictions per image, a list (one list of {rank, class_id, label, probability,
    logit} per image) that shows itself as a table in Jupyter."""

    def _repr_html_(self) -> str:
        tables = []
        for i, rows in enumerate(self):
            body = "".join(
                f"<tr><td>{r['rank']}</td><td>{r['class_id']}</td>"
                f"<td>{html.escape(str(r['label']))}</td><td>{r['probability']:.4f}</td>"
                f'<td><div style="background:#4c72b0;height:0.8em;'
                f'width:{100 * r["probability"]:.1f}px"></div></td>'
                f"<td>{r['logit']:.3f}</td></tr>"
                for r in rows
            )
            title = f"<caption>image {i}</caption>" if len(self) > 1 else ""
            tables.append(
                f'<table class="cnnscan-predictions">{title}<tr><th>rank</th><th>class</th>'
                f"<th>label</th><th>probability</th><th></th><th>logit</th></tr>{body}</table>"
            )
        return "".join(tables)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        lines = []
        for i, rows in enumerate(self):
            if len(self) > 1:
                lines.append(f"image {i}")
            lines += [
                f"{r['rank']}. {r['class_id']:4d} {r['label']:<30} {r['probability']:.4f}"
                for r in rows
            ]
        printer.text("\n".join(lines))


# -- filters and feature maps ----------------------------------------------------------------------
def show_filters(
    model: Any = None,
    layer: str | None = None,
    mode: str = "auto",
    *,
    max_filters: int = 64,
    max_channels: int = 32,
    tile_px: int = 32,
) -> Picture:
    """The filters of a convolution (default: the first) as a grid picture, as
    `cnnscan filters` draws them (see `cnnscan.render.filter_grid` for the modes)."""
    from cnnscan.learned import conv_layers, filters
    from cnnscan.models import as_model

    model = as_model(model)
    weights = filters(model, layer)
    picture = render.filter_grid(
        weights, mode, max_filters=max_filters, max_channels=max_channels, tile_px=tile_px
    )
    name = layer or conv_layers(model)[0]
    kernel = "×".join(map(str, weights.shape[1:]))
    shown = min(len(weights), max_filters)
    return Picture(picture, f"{name}: {len(weights)} filters of {kernel}, {shown} shown")


def show_feature_maps(
    model: Any,
    image: Any,
    layer: str,
    top: int | None = 16,
    *,
    scale: str = "shared",
    tile_px: int = 64,
) -> Picture:
    """The `top` strongest feature maps (by mean activation; None: all) of `layer` for one
    image as a grid picture, as `cnnscan features` draws them."""
    from cnnscan.errors import LayerError
    from cnnscan.learned import feature_maps, top_channels

    maps = feature_maps(model, image, layer)[layer]
    if maps.ndim != 4:
        raise LayerError(
            f"layer {layer} outputs shape {tuple(maps.shape)}, not feature maps (N, C, H, W); "
            "pick a convolutional layer (see `cnnscan layers`)"
        )
    channels = top_channels(maps[0], top)
    picture = render.feature_grid(maps[0], channels, scale=scale, tile_px=tile_px)
    shape = "×".join(map(str, maps.shape[1:]))
    return Picture(picture, f"{layer}: {shape}, {len(channels)} strongest channels")
