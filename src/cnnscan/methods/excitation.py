"""LRP family, excitation backprop: the top-down winning probabilities of a layer's units
(c-MWP), as LRP's z⁺ rule without biases on every conv/linear layer above it.

Excitation backprop sends a unit's probability to its inputs in proportion to x_i · w_ij⁺;
with non-negative inputs (after ReLUs) that is the z⁺ (α1β0) rule with the bias left out of
the normalizer, average pooling and residual sums split in proportion to their inputs, max
pooling and ReLU by their gradients, batch norm passed through: what the LRP tracer does
(`cnnscan.lrp`) seeded with probability 1 at the target instead of its logit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from cnnscan.errors import LayerError, MethodError
from cnnscan.layers import LayerRef
from cnnscan.lrp.composites import Composite, Conv, Params, RuleMap
from cnnscan.lrp.rules import Backward, Layer, Rule, ZPlus
from cnnscan.lrp.tracer import trace
from cnnscan.methods.cam import layer_name
from cnnscan.methods.registry import MethodResult, register

if TYPE_CHECKING:
    from cnnscan.scan import Scan

# torchray divides by the forward of the positive weights plus 1e-20: no stabilizer to speak of
_STABILIZER = 1e-20
_PARAMS = Params(stabilizer=_STABILIZER, zero_bias=True)


class _Side:
    """Which side of the classifier the backward passes take (read at backward time)."""

    negated = False


@dataclass(frozen=True)
class DualZPlus(Rule):
    """z⁺ of the layer, or while `side.negated` is set z⁺ of the layer with its weights
    negated: the dual of every output unit, which contrastive excitation backprop subtracts
    (torchray flips the classifier's weights and runs the model again)."""

    side: _Side
    name: ClassVar[str] = "dual_zplus"

    def prepare(self, layer: Layer) -> Backward:
        plain = ZPlus(_STABILIZER).prepare(layer)
        dual = ZPlus(_STABILIZER).prepare(replace(layer, weight=-layer.weight))
        return lambda c: dual(c) if self.side.negated else plain(c)


def classifier(module: nn.Module) -> str:
    """The name of the last conv or linear layer with a weight (torchray's classifier)."""
    for name, sub in reversed(list(module.named_modules())):
        if isinstance(sub, Conv | nn.Linear) and getattr(sub, "weight", None) is not None:
            return name
    raise MethodError("contrastive excitation backprop needs a model with a conv or linear layer")


def _probabilities(
    scan: Scan, runner: nn.Module, rules: dict, layer: str, targets: torch.Tensor, side: _Side
) -> torch.Tensor:
    """(N, T, 1, h, w): each target's winning probabilities at `layer`, summed over channels;
    with a `DualZPlus` classifier in `rules`, (N, T, 2, h, w): the target's and its dual's.
    Only the part of the network after the layer runs again (`Scan.head`), traced, on the
    layer's output from the scan's forward; then one backward per map."""
    ref = LayerRef.parse(layer)
    acts = scan.activations(ref).detach()
    if acts.ndim != 4:
        raise LayerError(
            f"layer {layer!r} outputs shape {tuple(acts.shape[1:])}; excitation backprop maps "
            "a spatial (C, H, W) layer"
        )
    names = {name for name, _ in runner.named_modules() if name}
    rule_map = RuleMap(Composite(rules, name="excitation"), _PARAMS, names, (acts, acts))
    dual = any(isinstance(rule, DualZPlus) for rule in rules.values())
    with scan.head(ref) as head:
        x = acts.clone().requires_grad_(True)
        with trace(runner, rule_map, x, torch.zeros_like(x, requires_grad=True)):
            logits = scan.checked_logits(head(x, torch.arange(len(x), device=x.device)))
    maps = []
    for t in range(targets.shape[1]):
        selected = logits.gather(1, targets[:, t : t + 1])
        # the tracer's backward carries relevance / activation: 1 / logit is probability 1
        seed = 1 / torch.where(selected >= 0, selected + _STABILIZER, selected - _STABILIZER)
        for negated in (False, True) if dual else (False,):
            side.negated = negated
            (grad,) = torch.autograd.grad(selected, x, seed.detach(), retain_graph=True)
            maps.append((acts * grad).sum(dim=1))
    side.negated = False
    return torch.stack(maps, dim=1).view(len(acts), targets.shape[1], -1, *acts.shape[2:])


@register(
    "excitation_backprop",
    family="lrp",
    space="layer",
    description="Excitation backprop: the top-down winning probability of a layer's units "
    "(z⁺ without bias above it); contrastive: minus the probability of the target's dual.",
    cost="1 forward + 1 backward per target (2 with contrastive)",
    paper="Zhang et al. 2016, arXiv:1608.00507 (ECCV); IJCV 2018",
    in_default_scan=False,
)
def excitation_backprop(
    scan: Scan,
    targets: torch.Tensor,
    *,
    layer: str | None = None,
    contrastive: bool = False,
) -> MethodResult:
    """torchray 1.0.0.2's `excitation_backprop` at `layer` (default: the last spatial layer):
    the excitation of the layer's output summed over channels. `contrastive=True` is its
    `contrastive_excitation_backprop` with the classifier's input as the contrast layer:
    the target's map minus the map of the classifier with negated weights, clipped at 0."""
    if not isinstance(contrastive, bool):
        raise MethodError(f"contrastive must be True or False, got {contrastive!r}")
    layer = layer_name(scan, layer)
    rules: dict = {Conv: ZPlus(_STABILIZER), nn.Linear: ZPlus(_STABILIZER)}
    side = _Side()
    with scan.runner() as runner:
        if contrastive:
            rules = {classifier(runner): DualZPlus(side), **rules}
        maps = _probabilities(scan, runner, rules, layer, targets, side)
    if contrastive:
        maps = (maps[:, :, :1] - maps[:, :, 1:]).clamp(min=0)
    return MethodResult(maps, {"contrastive": contrastive}, layer=layer)
