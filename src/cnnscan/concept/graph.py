"""The attribution graph (CRP): which concepts of an earlier layer feed a concept of a later
one, level by level down a list of layers."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cnnscan.concept.relevance import (
    Method,
    Propagation,
    channel_seeds,
    layer_relevance,
    lower_backward,
)
from cnnscan.errors import LayerError, TargetError
from cnnscan.lrp.composites import Composite
from cnnscan.methods.options import count
from cnnscan.models import ModelLike
from cnnscan.scan import Scan, make_scan
from cnnscan.targets import Targets


@dataclass
class Node:
    """A concept in the graph: channel `channel` of `layer`, its `relevance` for the target
    under the condition of the path above it (for a root: the target alone), and the
    concepts of the next layer that feed it most (`children`)."""

    layer: str
    channel: int
    relevance: float
    children: list[Node] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "channel": self.channel,
            "relevance": self.relevance,
            "children": [child.summary() for child in self.children],
        }


def concept_graph(
    model: ModelLike,
    image: Any,
    target: Targets = "top1",
    *,
    layers: Sequence[str],
    top: int = 3,
    method: Method = "lrp",
    composite: str | Composite = "epsilon_plus_depthwise",
    rules: Mapping | None = None,
    scan: Scan | None = None,
) -> list[Node]:
    """The `top` concepts of `layers[0]` for one target, each with the `top` concepts of
    `layers[1]` that carry most of its relevance, and so on down `layers` (later layers
    first: `["_blocks.15", "_blocks.12", "_blocks.8"]` is three levels). A child's
    relevance is the relevance of the target flowing through its whole path. Each level is
    one batched forward and backward with the paths of the level above as conditions."""
    if len(layers) < 1:
        raise LayerError("concept_graph needs at least one layer (later layers first)")
    propagation = Propagation.of(method, composite, rules)
    top = count("top", top)
    if scan is None:
        scan = make_scan(model, image)
    ids = scan.targets(target)[0]
    if len(ids) != 1:
        raise TargetError(f"concept_graph follows one target; got {len(ids)}")
    found = layer_relevance(scan, propagation, layers[0], ids)
    channels = found.channels[0]
    picked = channels.argsort(descending=True)[:top]
    frontier = [Node(layers[0], int(c), float(channels[c])) for c in picked]
    seeds = channel_seeds(found.backward[0], picked)
    roots = list(frontier)
    for upper, lower in itertools.pairwise(layers):
        acts, backward = lower_backward(scan, propagation, upper, lower, seeds)
        relevance = (acts * backward).sum(dim=(2, 3))  # (paths, channels)
        next_frontier, next_seeds = [], []
        for row, parent in enumerate(frontier):
            chosen = relevance[row].argsort(descending=True)[:top]
            for c in chosen.tolist():
                child = Node(lower, c, float(relevance[row, c]))
                parent.children.append(child)
                next_frontier.append(child)
            next_seeds.append(channel_seeds(backward[row], chosen))
        frontier, seeds = next_frontier, torch.cat(next_seeds)
    return roots
