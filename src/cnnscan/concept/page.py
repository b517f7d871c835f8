"""The concepts page: one self-contained HTML file (pictures embedded) that shows, per
target, the channels that carried its relevance with their heatmaps, footprints, pictures
and reference patches, and the faithfulness check."""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import numpy as np
import torch
import torch.nn.functional as F

from cnnscan import render
from cnnscan.report_pictures import cell_uri, data_uri

if TYPE_CHECKING:
    from cnnscan.concept.result import Concept, Concepts


def page_html(found: Concepts, *, fragment: bool = False) -> str:
    """The page as HTML; `fragment` leaves out the document head (for Jupyter)."""
    return _template().render(
        c=found,
        targets=[_target(found, t) for t in found.targets],
        photo=cell_uri(found.image),
        fragment=fragment,
    )


def save_page(found: Concepts, out: str | Path) -> Path:
    """Write the page (`concepts.html` in folder `out`) and return its path."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "concepts.html"
    path.write_text(page_html(found), encoding="utf-8")
    return path


def _target(found: Concepts, target: Any) -> dict[str, Any]:
    top = max((abs(c.share) for c in target.concepts), default=0.0) or 1.0
    return {
        "t": target,
        "passes": target.layer_total / target.score if target.score else None,
        "carried": sum(c.share for c in target.concepts),
        "concepts": [_concept(found, c, top) for c in target.concepts],
    }


def _concept(found: Concepts, concept: Concept, top: float) -> dict[str, Any]:
    return {
        "c": concept,
        "bar": round(100 * abs(concept.share) / top),
        "heatmap": cell_uri(heatmap_picture(found, concept)),
        "footprint": cell_uri(footprint_picture(found, concept)),
        "picture": None if concept.picture is None else cell_uri(concept.picture),
        "references": {
            kind: [(data_uri(p.pixels), p) for p in patches]
            for kind, patches in concept.references.items()
        },
    }


def heatmap_picture(found: Concepts, concept: Concept) -> np.ndarray:
    """The concept's conditional heatmap over the photo (uint8 RGB)."""
    return _over_photo(found.image, concept.heatmap)


def footprint_picture(found: Concepts, concept: Concept) -> np.ndarray:
    """The concept's relevance at the layer, each layer cell a block over the photo."""
    return _over_photo(found.image, _upsampled(concept.footprint, found))


def _over_photo(image: np.ndarray, values: torch.Tensor) -> np.ndarray:
    """A signed map over the photo on the diverging scale, ±its robust maximum at the ends."""
    shown, _ = render.scaled_view(values[None], "signed")
    return render.faded_overlay(image, shown, render.DIVERGING, signed=True)


def _upsampled(footprint: torch.Tensor, found: Concepts) -> torch.Tensor:
    """The layer map blown up to the photo's size, each layer cell a block."""
    size = found.image.shape[:2]
    return F.interpolate(footprint[None, None].float(), size=size, mode="nearest")[0, 0]


@functools.cache
def _template() -> jinja2.Template:
    text = resources.files("cnnscan").joinpath("templates/concepts.html.j2").read_text("utf-8")
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(text)
