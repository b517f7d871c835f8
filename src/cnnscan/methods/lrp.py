"""LRP family: layer-wise relevance propagation with zennit-style rules and composites.

One forward pass runs under the LRP tracer (`cnnscan.lrp.tracer`); each target then costs
one backward pass. The relevance of the input is reported per colour channel, and
`extras` holds the conservation error: Σ relevance − target logit (bias terms, ε and
rules other than ε/z⁺-like ones absorb or add relevance, so it is rarely exactly zero).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from cnnscan.errors import MethodError
from cnnscan.lrp.composites import Composite, Key, Params, RuleLike, RuleMap, named_composite
from cnnscan.lrp.tracer import Record, trace
from cnnscan.methods.registry import MethodResult, register
from cnnscan.scan import match_format

if TYPE_CHECKING:
    from cnnscan.models.preprocessing import Preprocessing
    from cnnscan.scan import Scan


def input_bounds(
    preprocessing: Preprocessing, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model-space images of pixel values 0 and 1, per channel: (1, C, 1, 1) each."""
    zeros = like.new_zeros((1, like.shape[1], 1, 1))
    return preprocessing.normalize(zeros), preprocessing.normalize(zeros + 1)


def resolve_composite(
    composite: str | Composite, rules: Mapping | None, params: Params
) -> Composite:
    """The composite named or given, with `rules` (layer names or types -> rules) on top."""
    if isinstance(composite, str):
        chosen = named_composite(composite, params)
    elif isinstance(composite, Composite):
        chosen = composite
    else:
        raise MethodError(
            f"composite must be a name or a cnnscan.lrp.Composite, got {type(composite).__name__}"
        )
    if rules is None:
        return chosen
    if not isinstance(rules, Mapping):
        raise MethodError(
            "rules must map layer names or module types to rules, e.g. "
            f"{{'features.0': 'zbox', nn.Linear: 'epsilon'}}; got {type(rules).__name__}"
        )
    return chosen.with_rules(rules)


@contextmanager
def lrp_pass(
    runner: nn.Module,
    inputs: torch.Tensor,
    preprocessing: Preprocessing,
    composite: Composite,
    params: Params,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, Record]]:
    """(x, sink, record): forwards of `runner(x)` run in this block have LRP as their
    backward; the relevance of the input is x ⊙ grad(x) + grad(sink) (see `trace`). `x` is
    a copy of `inputs` in the runner's memory format."""
    names = {name for name, _ in runner.named_modules() if name}
    rule_map = RuleMap(composite, params, names, input_bounds(preprocessing, inputs))
    x = match_format(inputs, runner).requires_grad_(True)
    sink = torch.zeros_like(x, requires_grad=True)
    with trace(runner, rule_map, x, sink) as record:
        yield x, sink, record


def input_relevance(
    x: torch.Tensor, sink: torch.Tensor, grads: tuple[torch.Tensor | None, ...]
) -> torch.Tensor:
    """The relevance of the input from the gradients of (x, sink) of an LRP backward."""
    grad_x, grad_sink = grads
    relevance = torch.zeros_like(x) if grad_x is None else x.detach() * grad_x
    return relevance if grad_sink is None else relevance + grad_sink


@register(
    "lrp",
    family="lrp",
    description="Layer-wise relevance propagation (rules ε, γ, z⁺, αβ, z^B, flat; "
    "composites such as epsilon_plus); reports the conservation error.",
    view="signed",
    cost="1 forward + 1 backward per target",
    paper="Bach et al. 2015, doi:10.1371/journal.pone.0130140; Montavon et al. 2019",
)
def lrp(
    scan: Scan,
    targets: torch.Tensor,
    *,
    composite: str | Composite = "epsilon_plus_depthwise",
    rules: Mapping[Key, RuleLike] | None = None,
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    stabilizer: float = 1e-6,
    zero_params: Literal["bias"] | None = None,
) -> MethodResult:
    """`composite`: epsilon_plus_depthwise (ε-plus with ε = 0.25 on depthwise convs; the
    same as epsilon_plus on networks without them), epsilon_plus, epsilon_plus_flat,
    epsilon_gamma_box, epsilon_alpha2_beta1, epsilon_alpha2_beta1_flat, or a
    `cnnscan.lrp.Composite`;
    `rules` maps layer names or module types to rules (names or `cnnscan.lrp` rule objects)
    and wins over the composite. `epsilon`, `gamma`, `stabilizer` set the rules given by
    name. z^B's bounds are the model's pixel range 0..1, normalized by its preprocessing.
    `zero_params="bias"` (zennit's option) leaves every layer's bias (BatchNorm's shift
    merged in) out of the rules' normalizers, so no relevance is absorbed by biases.
    """
    params = Params(epsilon, gamma, stabilizer, zero_bias=zero_params == "bias")
    chosen = resolve_composite(composite, rules, params)
    maps = []
    preprocessing = scan.model.preprocessing
    with scan.runner() as runner:
        with lrp_pass(runner, scan.inputs, preprocessing, chosen, params) as (x, sink, record):
            logits = scan.checked_logits(runner(x))
        for t in range(targets.shape[1]):
            selected = logits.gather(1, targets[:, t : t + 1]).sum()
            grads = torch.autograd.grad(
                selected, (x, sink), retain_graph=t < targets.shape[1] - 1, allow_unused=True
            )
            maps.append(input_relevance(x, sink, grads).contiguous())
    maps_t = torch.stack(maps, dim=1)
    totals = maps_t.sum(dim=(2, 3, 4))
    scores = logits.detach().gather(1, targets)
    error = totals - scores
    extras: dict[str, Any] = {
        "composite": chosen.name,
        "zero_params": zero_params,
        "relevance_sum": totals.cpu(),
        "conservation_error": error.cpu(),
        "conservation_error_relative": (error.abs() / scores.abs().clamp_min(1e-12)).cpu(),
        "rules": dict(record.rules),
        "merged_batchnorm": list(record.merged),
    }
    return MethodResult(maps_t, extras)
