"""`concepts`: which learned channels of a layer drove a prediction, and where."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cnnscan.batch.inputs import discover
from cnnscan.concept.pictures import feature_pictures, picture_layer, reference_patches
from cnnscan.concept.relevance import (
    Method,
    Propagation,
    ablation,
    channel_seeds,
    conditional_heatmaps,
    layer_relevance,
)
from cnnscan.concept.result import Concept, Concepts, TargetConcepts
from cnnscan.errors import MethodError
from cnnscan.lrp.composites import Composite
from cnnscan.methods.options import count
from cnnscan.models import ModelLike
from cnnscan.render import to_rgb
from cnnscan.scan import Scan, make_scan
from cnnscan.targets import Targets

CHECKED = 3  # channels zeroed by the ablation check


def concepts(
    model: ModelLike,
    image: Any,
    targets: Targets = "top1",
    *,
    layer: str | None = None,
    top: int = 6,
    method: Method = "lrp",
    composite: str | Composite = "epsilon_plus_depthwise",
    rules: Mapping | None = None,
    check: bool = True,
    pictures: bool = True,
    references: str | Path | None = None,
    reference_count: int = 4,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    max_memory: int | float | str | None = None,
    scan: Scan | None = None,
) -> Concepts:
    """The `top` channels (concepts) of `layer` that carried most of each target's relevance
    for one image, with their conditional heatmaps (CRP, Achtibat et al. 2023).

    `layer`: a name as `cnnscan layers` prints it (default: the last convolutional layer).
    `method`: "lrp" (with `composite` and `rules` as in the lrp method) or
    "gradient_x_activation". A concept's relevance is its signed share of the target's
    relevance at the layer; all channels' shares sum to the layer total, and all channels'
    conditional heatmaps to the unconditional heatmap. `check` zeroes the top three channels
    at the layer and compares the target logit's drop with that of random channels.
    `pictures`: each concept's synthesized feature visualization (cached on disk per
    model, layer and channel: `cnnscan.concept.pictures`). `references`: a folder (or glob,
    or table) of images; each concept gets the `reference_count` patches where it is most
    active and those where it is most relevant.
    """
    propagation = Propagation.of(method, composite, rules)
    top = count("top", top)
    reference_count = count("reference_count", reference_count)
    items = (
        [item for item in discover(references) if item.problem is None]
        if references is not None
        else []
    )
    if scan is None:
        scan = make_scan(model, image, device=device, batch_size=batch_size, max_memory=max_memory)
    if len(scan.inputs) != 1:
        raise MethodError(f"concepts explains one image at a time; got {len(scan.inputs)}")
    layer = layer if layer is not None else scan.default_layer()
    ids = scan.targets(targets)[0]
    found = layer_relevance(scan, propagation, layer, ids)
    channels = found.channels  # (T, C)
    k = min(top, channels.shape[1])
    ranked = channels.argsort(dim=1, descending=True)[:, :k]
    seeds = torch.cat([channel_seeds(found.backward[t], ranked[t]) for t in range(len(ids))])
    heatmaps = conditional_heatmaps(scan, propagation, layer, seeds).view(len(ids), k, -1)
    size = tuple(scan.inputs.shape[2:])
    results = []
    for t, class_id in enumerate(ids.tolist()):
        total = float(channels[t].sum())
        concepts_ = [
            Concept(
                channel=c,
                relevance=float(channels[t, c]),
                share=float(channels[t, c]) / total if total else 0.0,
                heatmap=heatmaps[t, i].view(size).cpu(),
                footprint=found.relevance[t, c].cpu(),
                activation=found.activations[c].cpu(),
            )
            for i, c in enumerate(ranked[t].tolist())
        ]
        checked = ranked[t, :CHECKED].tolist()
        results.append(
            TargetConcepts(
                class_id=class_id,
                label=scan.model.labels[class_id],
                score=float(found.scores[t]),
                layer_total=total,
                channels=channels[t].cpu(),
                concepts=concepts_,
                ablation=ablation(scan, layer, class_id, checked) if check else None,
            )
        )
    chosen = list(dict.fromkeys(c.channel for t in results for c in t.concepts))
    drawn = feature_pictures(scan.model, picture_layer(scan, layer), chosen) if pictures else {}
    patches = (
        reference_patches(scan.model, items, layer, chosen, propagation, count=reference_count)
        if items
        else {}
    )
    for target in results:
        for concept in target.concepts:
            concept.picture = drawn.get(concept.channel)
            concept.references = patches.get(concept.channel, {})
    prep = scan.model.preprocessing
    pixels = prep.denormalize(scan.inputs[:1].detach().cpu())[0].clamp(0, 1)
    return Concepts(
        model=scan.model.name,
        layer=layer,
        method=method,
        composite=None if propagation.composite is None else propagation.composite.name,
        image=to_rgb(pixels),
        targets=results,
        shape=tuple(found.activations.shape),
    )
