"""`Concepts`: the channels of a layer that carried a prediction's relevance, each with its
conditional heatmap, where it sits at the layer, and (when asked) its pictures."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnscan.concept.page import page_html, save_page
from cnnscan.concept.relevance import Ablation


@dataclass
class Patch:
    """A piece of a reference image: `pixels` uint8 (h, w, 3), the file it comes from, its
    box (left, top, right, bottom) in the model's view of that file, and the value that
    ranked it (the channel's largest activation, or its relevance)."""

    pixels: np.ndarray
    source: str
    box: tuple[int, int, int, int]
    value: float


@dataclass
class Concept:
    """One channel of the layer. `relevance`: its share of the target's relevance (signed);
    `share`: that as a fraction of the layer total; `heatmap` (H, W): the relevance of the
    input flowing only through this channel (summed over colour); `footprint` (h, w): its
    relevance at the layer; `activation` (h, w): its output there. `picture`: a synthesized
    image that excites it (uint8 (H, W, 3)); `references`: "activation" / "relevance" ->
    the patches of a folder of images that excite it most / where it is most relevant."""

    channel: int
    relevance: float
    share: float
    heatmap: torch.Tensor
    footprint: torch.Tensor
    activation: torch.Tensor
    picture: np.ndarray | None = None
    references: dict[str, list[Patch]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "relevance": self.relevance,
            "share": self.share,
            "heatmap_sum": float(self.heatmap.sum()),
            "peak": _peak(self.footprint),
            "references": {
                kind: [{"source": p.source, "box": list(p.box), "value": p.value} for p in patches]
                for kind, patches in self.references.items()
            },
        }


@dataclass
class TargetConcepts:
    """The concepts of one target class: the `top` channels by relevance, every channel's
    relevance (`channels`, (C,); it sums to `layer_total`), the target logit (`score`) and
    the ablation check of the top three (`ablation`)."""

    class_id: int
    label: str
    score: float
    layer_total: float
    channels: torch.Tensor
    concepts: list[Concept]
    ablation: Ablation | None = None

    def summary(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "class_id": self.class_id,
            "label": self.label,
            "score": self.score,
            "layer_total": self.layer_total,
            "concepts": [concept.summary() for concept in self.concepts],
        }
        if self.ablation is not None:
            found["ablation"] = {
                "channels": self.ablation.channels,
                "drop": self.ablation.top,
                "random_drops": self.ablation.random,
                "random_mean": self.ablation.random_mean,
                "faithful": self.ablation.faithful,
            }
        return found


@dataclass
class Concepts:
    """What `cnnscan.concepts` found for one image: per target, the layer's channels that
    carried its relevance. `image` is the model's view of the photo (uint8 (H, W, 3))."""

    model: str
    layer: str
    method: str
    composite: str | None
    image: np.ndarray
    targets: list[TargetConcepts]
    shape: tuple[int, int, int]  # the layer's (channels, height, width)

    def __getitem__(self, index: int) -> TargetConcepts:
        return self.targets[index]

    def __len__(self) -> int:
        return len(self.targets)

    def save(self, out: str | Path) -> list[Path]:
        """Write `concepts.html` (self-contained) and `concepts.json` (`summary`) to `out`."""
        page = save_page(self, out)
        data = Path(out) / "concepts.json"
        data.write_text(json.dumps(self.summary(), indent=1), encoding="utf-8")
        return [page, data]

    def _repr_html_(self) -> str:  # Jupyter shows the page
        return page_html(self, fragment=True)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the settings and, per target, its concepts (no pictures)."""
        return {
            "model": self.model,
            "layer": self.layer,
            "layer_shape": list(self.shape),
            "method": self.method,
            "composite": self.composite,
            "targets": [target.summary() for target in self.targets],
        }


def _peak(footprint: torch.Tensor) -> list[int]:
    """(row, column) of the footprint's largest relevance."""
    flat = int(footprint.flatten().argmax())
    return [flat // footprint.shape[1], flat % footprint.shape[1]]
