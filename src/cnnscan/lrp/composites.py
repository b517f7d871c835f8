"""Composites: which LRP rule each layer gets, declared as a small map.

A `Composite` maps module names and module types to rules (a `Rule` or its name), and may
give the first layer of some types its own rule (ZBox or Flat on the layer that reads the
image) and depthwise convolutions (one input channel per group) theirs. Lookup order for a
layer call: its module name, the first-layer rule, the depthwise rule, its type (the first
matching entry, subclasses included), then the base map (a BatchNorm that does not follow a
conv/linear passes relevance through, as in zennit). Five named composites are zennit's
composites of the same names; `epsilon_plus_depthwise` (the default) is ε-plus with
ε = 0.25 on depthwise convolutions, chosen by measurement on EfficientNet-Lite0
(docs/methods/lrp.md).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Union

import torch
from torch import nn

from cnnscan.errors import MethodError
from cnnscan.lrp.rules import (
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    Pass,
    Rule,
    WSquare,
    ZBox,
    ZPlus,
)

Conv = nn.modules.conv._ConvNd
BatchNorm = nn.modules.batchnorm._BatchNorm
RuleLike = Union[Rule, str]  # noqa: UP007 (a runtime alias)
Key = Union[str, type, tuple]  # noqa: UP007

RULE_NAMES = (
    "epsilon",
    "gamma",
    "zplus",
    "alpha2beta1",
    "alpha1beta0",
    "zbox",
    "flat",
    "wsquare",
    "pass",
)
COMPOSITES = (
    "epsilon_plus_depthwise",
    "epsilon_plus",
    "epsilon_plus_flat",
    "epsilon_gamma_box",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
)


@dataclass(frozen=True)
class Params:
    """The numbers that rules given by name take (method options), and whether every rule
    leaves the layers' biases out of its normalization (zennit's `zero_params="bias"`)."""

    epsilon: float = 1e-6
    gamma: float = 0.25
    stabilizer: float = 1e-6
    zero_bias: bool = False


def make_rule(rule: RuleLike, params: Params | None = None) -> Rule:
    """A Rule from a Rule or a rule name ("epsilon", "zplus", "alpha2beta1", ...)."""
    if isinstance(rule, Rule):
        return rule
    params = params or Params()
    key = rule.strip().lower().replace("-", "_") if isinstance(rule, str) else None
    stab = params.stabilizer
    named = {
        "epsilon": lambda: Epsilon(params.epsilon),
        "gamma": lambda: Gamma(params.gamma, stab),
        "zplus": lambda: ZPlus(stab),
        "alpha2beta1": lambda: AlphaBeta(2.0, 1.0, stab),
        "alpha1beta0": lambda: AlphaBeta(1.0, 0.0, stab),
        "zbox": lambda: ZBox(stabilizer=stab),
        "flat": lambda: Flat(stab),
        "wsquare": lambda: WSquare(stab),
        "pass": lambda: Pass(),
    }
    if key not in named:
        close = difflib.get_close_matches(str(key), RULE_NAMES, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise MethodError(
            f"unknown LRP rule {rule!r}.{hint} Rules: {', '.join(RULE_NAMES)} "
            "(or a rule object from cnnscan.lrp, e.g. Epsilon(0.25))"
        )
    return named[key]()


@dataclass(frozen=True)
class Composite:
    """Rules by module name or type; `first` is the rule of the first layer (in execution
    order) whose type is one of `first_types`; `depthwise` the rule of convolutions with one
    input channel per group (MobileNet's and EfficientNet's depthwise convs)."""

    layers: Mapping[Key, RuleLike] = field(default_factory=dict)
    first: RuleLike | None = None
    first_types: tuple[type, ...] = (Conv,)
    name: str = "custom"
    depthwise: RuleLike | None = None

    def with_rules(self, rules: Mapping[Key, RuleLike]) -> Composite:
        """This composite with `rules` matched before its own layer map."""
        merged = dict(rules)
        for key, rule in self.layers.items():
            merged.setdefault(key, rule)
        return replace(self, layers=merged)


def named_composite(name: str, params: Params | None = None) -> Composite:
    """One of zennit's composites by name (see COMPOSITES)."""
    params = params or Params()
    key = name.strip().lower().replace("-", "_")
    eps, stab = Epsilon(params.epsilon), params.stabilizer
    flat_first = {"first": Flat(stab), "first_types": (Conv, nn.Linear)}
    table = {
        "epsilon_plus_depthwise": (
            {Conv: ZPlus(stab), nn.Linear: eps},
            {"depthwise": Epsilon(DEPTHWISE_EPSILON)},
        ),
        "epsilon_plus": ({Conv: ZPlus(stab), nn.Linear: eps}, {}),
        "epsilon_plus_flat": ({Conv: ZPlus(stab), nn.Linear: eps}, flat_first),
        "epsilon_gamma_box": (
            {Conv: Gamma(params.gamma, stab), nn.Linear: eps},
            {"first": ZBox(stabilizer=stab), "first_types": (Conv,)},
        ),
        "epsilon_alpha2_beta1": ({Conv: AlphaBeta(2.0, 1.0, stab), nn.Linear: eps}, {}),
        "epsilon_alpha2_beta1_flat": (
            {Conv: AlphaBeta(2.0, 1.0, stab), nn.Linear: eps},
            flat_first,
        ),
    }
    if key not in table:
        close = difflib.get_close_matches(key, COMPOSITES, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise MethodError(
            f"unknown LRP composite {name!r}.{hint} Composites: {', '.join(COMPOSITES)} "
            "(or a cnnscan.lrp.Composite)"
        )
    layers, extra = table[key]
    return Composite(layers, name=key, **extra)


# z⁺ loses the relevance of a depthwise channel whose kernel has no positive weight (after
# the BatchNorm merge): ε there kept more of it and scored better (docs/methods/lrp.md)
DEPTHWISE_EPSILON = 0.25
_BASE: dict[type, Rule] = {BatchNorm: Pass()}


class RuleMap:
    """A composite resolved for one model: `lookup(name, type)` -> Rule or None."""

    def __init__(
        self,
        composite: Composite,
        params: Params,
        names: set[str],
        bounds: tuple[torch.Tensor, torch.Tensor],
    ):
        self.by_name: dict[str, Rule] = {}
        self.by_type: list[tuple[tuple[type, ...], Rule]] = []
        for key, rule in composite.layers.items():
            resolved = self._bounded(make_rule(rule, params), bounds)
            if isinstance(key, str):
                if key not in names:
                    raise MethodError(_unknown_layer(key, names))
                self.by_name[key] = resolved
            else:
                self.by_type.append((_types(key), resolved))
        self.first = None
        if composite.first is not None:
            self.first = self._bounded(make_rule(composite.first, params), bounds)
        self.first_types = _types(composite.first_types)
        self.first_used = False
        self.depthwise = None
        if composite.depthwise is not None:
            self.depthwise = make_rule(composite.depthwise, params)
        self.zero_bias = params.zero_bias

    @staticmethod
    def _bounded(rule: Rule, bounds: tuple[torch.Tensor, torch.Tensor]) -> Rule:
        """ZBox without bounds gets the model's input range."""
        if isinstance(rule, ZBox) and (rule.low is None or rule.high is None):
            low = bounds[0] if rule.low is None else rule.low
            high = bounds[1] if rule.high is None else rule.high
            return replace(rule, low=low, high=high)
        return rule

    def lookup(self, name: str | None, kind: type, depthwise: bool = False) -> Rule | None:
        if name is not None and name in self.by_name:
            return self.by_name[name]
        if self.first is not None and not self.first_used and issubclass(kind, self.first_types):
            self.first_used = True
            return self.first
        if depthwise and self.depthwise is not None:
            return self.depthwise
        for types, rule in self.by_type:
            if issubclass(kind, types):
                return rule
        for base, rule in _BASE.items():
            if issubclass(kind, base):
                return rule
        return None


def _types(key: Key) -> tuple[type, ...]:
    types = key if isinstance(key, tuple) else (key,)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise MethodError(
            f"LRP rules are keyed by a module name (str) or module type(s) (e.g. nn.Conv2d), "
            f"got {key!r}"
        )
    return types


def _unknown_layer(name: str, names: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(names), n=4, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (
        f"rules name the layer {name!r}, which the model does not have.{hint} "
        "`cnnscan layers MODEL` lists the layer names."
    )
