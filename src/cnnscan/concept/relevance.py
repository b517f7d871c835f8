"""Concept relevance (CRP, Achtibat et al. 2023, Nature Machine Intelligence): how much of
a target's relevance passes through each channel of a layer, and where in the image each
channel's share comes from.

Relevance reaches a layer's output A as a backward value c (LRP's modified gradient, or the
plain gradient); its relevance there is A ⊙ c. The conditional heatmap of channel k is the
backward of c with every other channel zeroed, continued from the layer to the input. The
backward is linear in c, so the channels' conditional heatmaps sum to the unconditional one
when all relevance passes through the layer. All conditions share one forward that stops at
the layer, then one backward per condition from it (measured: a batch of the image repeated
per condition costs K forwards and K times the memory for the same backward work).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from cnnscan.choices import CONCEPT_METHODS
from cnnscan.errors import LayerError, MethodError
from cnnscan.layers import Capture, LayerRef, StopForward, capture, stop_after
from cnnscan.lrp.composites import Composite, Params
from cnnscan.methods.lrp import input_relevance, lrp_pass, resolve_composite
from cnnscan.methods.options import generator
from cnnscan.scan import match_format

if TYPE_CHECKING:
    from cnnscan.scan import Scan

Method = Literal["lrp", "gradient_x_activation"]


@dataclass(frozen=True)
class Propagation:
    """How relevance flows back: LRP with `composite`, or plain gradients (`composite`
    None: relevance is gradient × activation at the layer and gradient × input below)."""

    method: str
    composite: Composite | None = None
    params: Params | None = None

    @classmethod
    def of(
        cls, method: str, composite: str | Composite, rules: Mapping | None = None
    ) -> Propagation:
        if method == "gradient_x_activation":
            return cls(method)
        if method != "lrp":
            raise MethodError(
                f"concepts: method must be one of {', '.join(CONCEPT_METHODS)}; got {method!r}"
            )
        params = Params()
        return cls(method, resolve_composite(composite, rules, params), params)

    @contextmanager
    def forward(
        self, scan: Scan, runner: nn.Module, inputs: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(x, sink): forwards of `runner(x)` in this block propagate back by this rule."""
        if self.composite is None:
            yield match_format(inputs, runner).requires_grad_(True), None
            return
        assert self.params is not None
        with lrp_pass(runner, inputs, scan.model.preprocessing, self.composite, self.params) as (
            x,
            sink,
            _,
        ):
            yield x, sink

    @staticmethod
    def to_input(
        x: torch.Tensor,
        sink: torch.Tensor | None,
        output: torch.Tensor,
        seed: torch.Tensor,
        retain_graph: bool = False,
    ) -> torch.Tensor:
        """The relevance of the input (summed over colour) of the backward of `seed` from
        `output`: (N, H, W). `retain_graph` keeps the forward for another backward."""
        leaves = (x,) if sink is None else (x, sink)
        grads = torch.autograd.grad(
            output, leaves, grad_outputs=seed, retain_graph=retain_graph, allow_unused=True
        )
        both = (grads[0], None) if sink is None else grads
        return input_relevance(x, sink, both).sum(dim=1)


@dataclass
class LayerRelevance:
    """One image's relevance at a layer for T targets: `activations` (C, h, w), `backward`
    (T, C, h, w) the backward values there (what conditions mask), `relevance` (T, C, h, w)
    = activations ⊙ backward, `scores` (T,) the target logits."""

    activations: torch.Tensor
    backward: torch.Tensor
    relevance: torch.Tensor
    scores: torch.Tensor

    @property
    def channels(self) -> torch.Tensor:
        """Each channel's relevance per target (T, C); each row sums to the layer total."""
        return self.relevance.sum(dim=(2, 3))


def layer_relevance(
    scan: Scan, propagation: Propagation, layer: str, targets: torch.Tensor
) -> LayerRelevance:
    """The relevance at `layer` of the scan's one image for `targets` (T,) class ids: one
    forward, then one backward per target through the part of the network after the layer."""
    ref = LayerRef.parse(layer)
    if propagation.composite is None:  # plain gradients: the scan's own forward serves
        acts = scan.activations(ref)[0].detach()
        backward = scan.layer_gradients(ref, targets.view(1, -1))[0]
        scores = scan.scores(targets.view(1, -1))[0]
    else:
        with scan.runner() as runner, capture(runner, [ref], protect=()) as captured:
            with propagation.forward(scan, runner, scan.inputs) as (x, _):
                logits = scan.checked_logits(runner(x))
            out = _recorded(captured, ref)
            rows = []
            for t, target in enumerate(targets.tolist()):
                (grad,) = torch.autograd.grad(
                    logits[0, target],
                    out,
                    retain_graph=t < len(targets) - 1,
                    allow_unused=True,
                )
                rows.append(torch.zeros_like(out) if grad is None else grad)
        acts = out[0].detach()
        backward = torch.cat(rows)
        scores = logits.detach()[0, targets]
    if acts.ndim != 3:
        raise LayerError(
            f"layer {ref} has output shape {tuple(acts.shape)}; concepts need a convolutional "
            "layer with (channels, height, width) outputs (see `cnnscan layers`)"
        )
    backward = backward.contiguous()
    return LayerRelevance(acts, backward, acts * backward, scores)


def conditional_heatmaps(
    scan: Scan, propagation: Propagation, layer: str, seeds: torch.Tensor
) -> torch.Tensor:
    """Input-space relevance (K, H, W) of K conditions: `seeds` (K, C, h, w) are the
    backward values to start from at `layer` (a target's, masked to the condition's
    channels). One forward that stops at the layer, then one backward per condition."""
    ref = LayerRef.parse(layer)
    with scan.runner() as runner, capture(runner, [ref], protect=()) as captured:
        try:
            with (
                stop_after(runner, [ref], captured),
                propagation.forward(scan, runner, scan.inputs[:1]) as (x, sink),
            ):
                runner(x)
        except StopForward:
            pass
        out = _recorded(captured, ref)
        last = len(seeds) - 1
        maps = [
            propagation.to_input(x, sink, out, seed.unsqueeze(0).to(out), retain_graph=k < last)
            for k, seed in enumerate(seeds)
        ]
    return torch.cat(maps)


def lower_backward(
    scan: Scan, propagation: Propagation, upper: str, lower: str, seeds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations (C', h', w'), backward values (K, C', h', w')) at the earlier layer
    `lower` of K conditions given as backward values `seeds` (K, C, h, w) at `upper`: the
    relevance of `lower`'s channels for a concept of `upper` (CRP's attribution graph). One
    batched forward that stops at `upper` and one backward from it to `lower`."""
    refs = [LayerRef.parse(upper), LayerRef.parse(lower)]
    inputs = scan.inputs[:1].expand(len(seeds), -1, -1, -1)
    with scan.runner() as runner, capture(runner, refs, protect=()) as captured:
        try:
            with (
                stop_after(runner, refs, captured),
                propagation.forward(scan, runner, inputs) as (
                    x,
                    _,
                ),
            ):
                runner(x)
        except StopForward:
            pass
        top, bottom = _recorded(captured, refs[0]), _recorded(captured, refs[1])
        (grad,) = torch.autograd.grad(top, bottom, grad_outputs=seeds.to(top), allow_unused=True)
    if grad is None:
        raise LayerError(f"layer {lower} does not feed layer {upper}: name an earlier layer")
    return bottom[0].detach(), grad


def channel_seeds(backward: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """`backward` (C, h, w) kept only at one channel per row: (K, C, h, w) for `channels` (K,)."""
    mask = torch.zeros(len(channels), backward.shape[0], 1, 1, dtype=backward.dtype)
    mask[torch.arange(len(channels)), channels] = 1
    return mask.to(backward.device) * backward


@dataclass
class Ablation:
    """Target logit drops when channels are zeroed at the layer: `top` for the given
    channels, `random` for `len(random)` random sets of as many channels."""

    channels: list[int]
    top: float
    random: list[float]

    @property
    def random_mean(self) -> float:
        return sum(self.random) / len(self.random)

    @property
    def faithful(self) -> bool:
        """Zeroing the concepts lowers the logit more than zeroing random channels does."""
        return self.top > self.random_mean


def ablation(
    scan: Scan, layer: str, target: int, channels: list[int], draws: int = 20, seed: int = 0
) -> Ablation:
    """Zero `channels` at `layer` (and `draws` random sets of as many) and measure how much
    the target logit falls: the part of the network after the layer runs once per set."""
    ref = LayerRef.parse(layer)
    acts = scan.activations(ref).detach()[:1]
    n = acts.shape[1]
    gen = generator(seed)
    sets = [channels] + [
        torch.randperm(n, generator=gen)[: len(channels)].tolist() for _ in range(draws)
    ]
    edited = acts.repeat(len(sets) + 1, 1, 1, 1)
    for row, chosen in enumerate(sets, start=1):
        edited[row, chosen] = 0
    with scan.head(ref) as head, torch.no_grad():
        logits = head(edited, torch.zeros(len(edited), dtype=torch.long, device=acts.device))
    drops = (logits[0, target] - logits[1:, target]).tolist()
    return Ablation(list(channels), drops[0], drops[1:])


def _recorded(captured: Capture, ref: LayerRef) -> torch.Tensor:
    if ref not in captured:
        raise LayerError(f"layer {ref} did not run before the logits; choose a layer on the way")
    return captured[ref]
