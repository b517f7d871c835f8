"""Faithfulness: does the model's confidence follow the map?

- Deletion / insertion (Petsiuk et al. 2018, RISE, arXiv:1806.07421): pixels are removed
  from the image (replaced by a substrate) or inserted into the substrate in order of
  decreasing relevance, in `steps` equal steps; the curve is the target's softmax
  probability against the fraction of pixels changed, and the score its area (trapezoid).
  Deletion: lower is better; insertion: higher is better.
- Average drop / increase in confidence (Chattopadhay et al. 2018, as used by Score-CAM,
  Wang et al. 2020): the min-max scaled map multiplies the model input (a soft mask);
  drop = 100 · max(0, Y − O) / Y and increase = 100 · [O > Y], with Y, O the target's
  probabilities on the input and on the masked input.

All perturbed inputs are built lazily, chunk by chunk, and run through `Scan.logits_at`
in batches of a fixed size; the curves' end points are known (the input and the substrate) and
cost no forward per map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cnnscan.attribution import minmax_maps
from cnnscan.errors import MetricError
from cnnscan.methods.baselines import BASELINES, make_baseline
from cnnscan.methods.options import generator
from cnnscan.metrics.registry import Column, MetricContext, number_text, register_metric
from cnnscan.scan import Scan

# RISE's choices: deletion replaces pixels by zeros of the model input (the dataset mean
# colour), insertion starts from a blurred copy of the image.
DEFAULT_SUBSTRATES = {"deletion": "zero", "insertion": "blur"}


def pixel_counts(steps: int, pixels: int) -> torch.Tensor:
    """How many pixels are changed after step i = 0..steps: round(i · pixels / steps)."""
    i = torch.arange(steps + 1, dtype=torch.long)
    return (2 * i * pixels + steps) // (2 * steps)


def deletion_order(rel: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Rank of every pixel in the removal order (0 = most relevant first): (M, H, W).

    Ties (e.g. the zeros of a relu'd CAM, or a constant map) are broken by one seeded random
    permutation of the pixels, so a map without order scores like a random ordering."""
    m, h, w = rel.shape
    perm = torch.randperm(h * w, generator=generator(seed)).to(rel.device)
    shuffled = rel.flatten(1)[:, perm]
    order = perm[shuffled.argsort(dim=1, descending=True, stable=True)]
    positions = torch.arange(h * w, device=rel.device).expand(m, -1)
    return torch.empty_like(order).scatter_(1, order, positions).view(m, h, w)


def trapezoid(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Area under each curve y (M, K) over the points x (K,)."""
    dx = (x[1:] - x[:-1]).to(y)
    return ((y[:, 1:] + y[:, :-1]) / 2 * dx).sum(dim=1)


class _CurveInputs:
    """The interior points of many curves, built lazily: row (curve c, step s) keeps the
    input's pixels whose rank says they are (deletion) not yet removed / (insertion)
    already inserted, and takes the substrate's elsewhere."""

    def __init__(self, inputs, substrates, image, substrate, ranks, insert, counts):
        self.inputs, self.substrates = inputs, substrates
        self.image, self.substrate, self.ranks, self.insert = image, substrate, ranks, insert
        self.counts = counts  # (S,) interior pixel counts

    def __len__(self) -> int:
        return len(self.ranks) * len(self.counts)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        index = torch.arange(len(self), device=self.ranks.device)[rows]
        curve, step = index // len(self.counts), index % len(self.counts)
        changed = self.ranks[curve] < self.counts[step].view(-1, 1, 1)
        from_input = torch.where(self.insert[curve].view(-1, 1, 1), changed, ~changed)
        return torch.where(
            from_input.unsqueeze(1),
            self.inputs[self.image[curve]],
            self.substrates[self.substrate[curve]],
        )


@dataclass
class Curves:
    """Curves of M maps: probabilities (M, steps + 1) over `fractions`, per kind
    ("deletion", "insertion")."""

    fractions: torch.Tensor
    probabilities: dict[str, torch.Tensor]

    def auc(self, kind: str) -> torch.Tensor:
        return trapezoid(self.probabilities[kind], self.fractions)


def substrate_inputs(scan: Scan, kind: str | torch.Tensor) -> torch.Tensor:
    """The substrate for every image of the scan (N, 3, H, W): a `make_baseline` kind or a
    tensor (3, H, W) / (N, 3, H, W) in model-input space."""
    if isinstance(kind, str) and kind not in BASELINES:
        raise MetricError(f"unknown substrate {kind!r}; use one of {', '.join(BASELINES)}")
    try:
        return make_baseline(scan, kind)
    except ValueError as e:  # a MethodError about a tensor's shape: say it for metrics
        raise MetricError(str(e).replace("baseline", "substrate")) from e


def causal_curves(
    scan: Scan,
    rel: torch.Tensor,
    image: torch.Tensor,
    target: torch.Tensor,
    *,
    kinds: tuple[str, ...] = ("deletion", "insertion"),
    steps: int = 50,
    substrates: dict[str, str | torch.Tensor] | None = None,
    seed: int = 0,
    progress=None,
) -> Curves:
    """Deletion and/or insertion curves for M relevance maps `rel` (M, H, W) of images
    `image` (M,) of the scan for classes `target` (M,), in one batched pass. Maps that order
    an image's pixels the same way (e.g. CAM and Grad-CAM on a global-average-pooled head, or
    one map explaining several classes) share their perturbed forwards: a forward gives every
    class's probability."""
    m, h, w = rel.shape
    pixels = h * w
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= pixels:
        raise MetricError(f"steps must be an integer from 1 to {pixels} (pixels), got {steps!r}")
    chosen = {**DEFAULT_SUBSTRATES, **(substrates or {})}
    n = len(scan.inputs)
    bank = torch.cat([substrate_inputs(scan, chosen[kind]) for kind in kinds])
    counts = pixel_counts(steps, pixels).to(rel.device)
    orders = torch.cat([image.view(-1, 1), deletion_order(rel, seed).flatten(1)], dim=1)
    distinct, which = torch.unique(orders, dim=0, return_inverse=True)  # (U, 1 + H·W), (M,)
    u = len(distinct)
    k = len(kinds)
    curve_image = distinct[:, 0].repeat(k)
    insert = torch.tensor([kind == "insertion" for kind in kinds], device=rel.device)
    points = _CurveInputs(
        scan.inputs,
        bank,
        curve_image,
        curve_image + n * torch.arange(k, device=rel.device).repeat_interleave(u),
        distinct[:, 1:].view(u, h, w).repeat(k, 1, 1),
        insert.repeat_interleave(u),
        counts[1:-1],
    )
    interior = steps - 1
    probs = scan.logits_at(points, progress).softmax(dim=1) if len(points) else None
    p_input = scan.logits.detach().softmax(dim=1)[image, target].unsqueeze(1)
    p_substrate = scan.logits_at(bank).softmax(dim=1)  # (k·N, classes)
    curves = {}
    for i, kind in enumerate(kinds):
        middle = p_input.new_zeros((m, 0))
        if probs is not None:
            rows = ((i * u + which) * interior).view(-1, 1) + torch.arange(
                interior, device=rel.device
            )
            middle = probs[rows, target.view(-1, 1)]
        p_other = p_substrate[image + i * n, target].unsqueeze(1)
        start, end = (p_other, p_input) if kind == "insertion" else (p_input, p_other)
        curves[kind] = torch.cat([start, middle, end], dim=1).cpu()
    return Curves(counts.double().cpu() / pixels, curves)


def confidence_change(
    scan: Scan, rel: torch.Tensor, image: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(average drop %, increase in confidence %) per map, each (M,): the map min-max scaled
    to [0, 1] multiplies the model input."""
    masks = minmax_maps(rel).to(scan.inputs.dtype)
    masked = _MaskedInputs(scan.inputs, image, masks)
    out = scan.logits_at(masked).softmax(dim=1)
    o = out.gather(1, target.unsqueeze(1)).squeeze(1)
    y = scan.logits.detach().softmax(dim=1)[image, target]
    drop = 100 * (y - o).clamp_min(0) / y
    increase = 100 * (o > y).to(y.dtype)
    return drop.cpu(), increase.cpu()


class _MaskedInputs:
    def __init__(self, inputs: torch.Tensor, image: torch.Tensor, masks: torch.Tensor):
        self.inputs, self.image, self.masks = inputs, image, masks

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.inputs[self.image[rows]] * self.masks[rows].unsqueeze(1)


def _curve_metric(kind: str) -> Callable[[MetricContext], dict[str, dict[str, Any]]]:
    """The deletion or insertion metric: its AUC per map and its curve (for plots)."""

    def metric(ctx: MetricContext) -> dict[str, dict[str, Any]]:
        curves = causal_curves(
            ctx.scan,
            ctx.stacked,
            ctx.image_ids,
            ctx.target_ids,
            kinds=(kind,),
            steps=ctx.steps,
            substrates=None if ctx.substrate is None else {kind: ctx.substrate},
            seed=ctx.seed,
            progress=ctx.progress,
        )
        aucs, probabilities = ctx.split(curves.auc(kind)), ctx.split(curves.probabilities[kind])
        fractions = curves.fractions.tolist()
        return {
            name: {
                f"{kind}_auc": aucs[name],
                "curves": {"fraction": fractions, kind: probabilities[name]},
            }
            for name in ctx.names
        }

    return metric


register_metric(
    "deletion_auc",
    family="faithfulness",
    description="Area under the target's probability as the most relevant pixels are removed "
    "first (replaced by the substrate, zeros by default).",
    higher_is_better=False,
    forwards_only=True,
    reference=True,
    aliases=("deletion",),
    title="deletion↓",
    cost="steps − 1 forwards per map, batched",
    paper="Petsiuk et al. 2018, arXiv:1806.07421",
)(_curve_metric("deletion"))
register_metric(
    "insertion_auc",
    family="faithfulness",
    description="Area under the target's probability as the most relevant pixels are inserted "
    "first into the substrate (a blurred copy by default).",
    higher_is_better=True,
    forwards_only=True,
    reference=True,
    aliases=("insertion",),
    title="insertion↑",
    cost="steps − 1 forwards per map, batched",
    paper="Petsiuk et al. 2018, arXiv:1806.07421",
)(_curve_metric("insertion"))


@register_metric(
    "average_drop",
    family="faithfulness",
    description="Drop of the target's probability (%) when the min-max scaled map masks the "
    "input, and whether it rose instead (increase in confidence).",
    higher_is_better=False,
    reference=True,
    columns=(
        Column("average_drop", "drop%↓", lambda v: number_text(v, 1)),
        Column("increase_in_confidence", "incr%↑", lambda v: number_text(v, 0)),
    ),
    cost="1 forward per map, batched",
    paper="Chattopadhay et al. 2018, arXiv:1710.11063",
)
def average_drop(ctx: MetricContext) -> dict[str, dict[str, Any]]:
    drop, increase = confidence_change(ctx.scan, ctx.stacked, ctx.image_ids, ctx.target_ids)
    drops, increases = ctx.split(drop), ctx.split(increase)
    return {
        name: {"average_drop": drops[name], "increase_in_confidence": increases[name]}
        for name in ctx.names
    }
