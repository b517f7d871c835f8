"""LRP rules: how one linear layer hands the relevance of its output to its input.

The backward pass carries c = R / x, the relevance per unit of input (the "gradient × input"
form): the relevance of any tensor t is t ⊙ c_t. Plain autograd is then already LRP wherever
LRP wants it: ReLU, max-pooling (winner takes all), additions and average pooling (relevance
split in proportion to the summands), reshapes and concatenations. A rule replaces the
backward of one conv / linear / batch-norm call. `prepare(layer)` does the work that does not
depend on the target -- the rule's normalizer z and small graphs for its transposed
convolutions -- once; the function it returns maps c_out to c_in for each target.

ZBox, Flat and WSquare give relevance to inputs that are zero, which c cannot carry: they
return the relevance itself and may only sit on the layer that reads the image.
Formulas and parameters follow zennit's rules of the same names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from cnnscan.errors import MethodError

Backward = Callable[[torch.Tensor], torch.Tensor]


class Layer(Protocol):
    """What a rule sees of one layer call (see `cnnscan.lrp.tracer`)."""

    x: torch.Tensor  # the input relevance goes to (detached)
    weight: torch.Tensor  # effective weight (BatchNorm merged in)
    bias: torch.Tensor | None
    linear: bool  # op(0, w, None) == 0 (conv, linear; not batch norm)

    def op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's computation with other weights (the same strides, padding, groups)."""
        ...

    def output(self) -> torch.Tensor:
        """The layer's output in the forward pass."""
        ...


def stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """z + ε·sign(z), with sign(0) = +1 (zennit's stabilizer)."""
    return z + torch.where(z >= 0, epsilon, -epsilon)


def _pos(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(min=0)


def _neg(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(max=0)


class _Terms:
    """Outputs op(input_k, w_k, b_k) with their graphs kept, so that each target's backward
    costs only the transposed operations: `transpose(grads)` = Σ_k J_kᵀ grads_k per input.
    An input given as None is known to add nothing (a zero input of a linear op)."""

    def __init__(self, layer: Layer, inputs: list[torch.Tensor | None]):
        self.layer = layer
        self.leaves = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
        self.outputs: list[torch.Tensor] = []
        self.sources: list[int] = []

    def add(self, source: int, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """op(inputs[source], weight, bias), detached (the graph stays here)."""
        with torch.enable_grad():
            out = self.layer.op(self.leaves[source], weight, bias)
        self.outputs.append(out)
        self.sources.append(source)
        return out.detach()

    def transpose(self, grads: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Σ_k J_kᵀ grads_k for each input (None for an input no output used)."""
        used = sorted(set(self.sources))
        found = torch.autograd.grad(
            self.outputs, [self.leaves[i] for i in used], grads, retain_graph=True
        )
        result: list[torch.Tensor | None] = [None] * len(self.leaves)
        for i, g in zip(used, found, strict=True):
            result[i] = g
        return result


def _check(name: str, value: float, *, positive: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise MethodError(f"{name} must be a number {'>' if positive else '>='} 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Rule:
    """Base class. `proportional` rules return c_in (relevance = input ⊙ c_in)."""

    name: ClassVar[str] = "rule"
    proportional: ClassVar[bool] = True

    def prepare(self, layer: Layer) -> Backward:
        raise NotImplementedError


@dataclass(frozen=True)
class Epsilon(Rule):
    """R_in = x ⊙ Wᵀ (R_out / (z + ε·sign z)), z = Wx + b. ε → 0 is gradient × input."""

    epsilon: float = 1e-6
    name: ClassVar[str] = "epsilon"

    def __post_init__(self):
        _check("epsilon", self.epsilon)

    def prepare(self, layer: Layer) -> Backward:
        terms = _Terms(layer, [layer.x])
        z = terms.add(0, layer.weight, layer.bias)
        y = z if layer.bias is not None else layer.output()  # z ≠ y if the bias is left out
        ratio = y / stabilize(z, self.epsilon)  # R_out / stab(z) = c_out · ratio
        return lambda c: terms.transpose([c * ratio])[0]


class _SignSplit:
    """x⁺ / x⁻ terms of the sign-aware rules: c_in = 1[x>0]·g(x⁺) + 1[x<0]·g(x⁻). The x⁻
    terms are dropped when x has no negative values and the op is linear (after a ReLU)."""

    def __init__(self, layer: Layer):
        x = layer.x
        negative = not layer.linear or bool((x < 0).any())
        self.terms = _Terms(layer, [x.clamp(min=0), x.clamp(max=0) if negative else None])
        self.positive = x > 0
        self.negative = x < 0 if negative else None

    def z(self, pairs: list[tuple[int, torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """Σ op(x^±, w, b) over the pairs (source, weight, bias) whose input is not dropped."""
        total = None
        for source, weight, bias in pairs:
            if self.terms.leaves[source] is not None:
                out = self.terms.add(source, weight, bias)
                total = out if total is None else total + out
        assert total is not None
        return total

    def backward(self, scales: list[torch.Tensor]) -> Backward:
        """scales[k]: what c_out is multiplied by for the k-th output added by `z`."""

        def run(c: torch.Tensor) -> torch.Tensor:
            products: dict[int, torch.Tensor] = {}
            for s in scales:
                if id(s) not in products:
                    products[id(s)] = c * s
            g_pos, g_neg = self.terms.transpose([products[id(s)] for s in scales])
            assert g_pos is not None
            c_in = g_pos * self.positive
            return c_in if g_neg is None else c_in.add_(g_neg * self.negative)

        return run

    def count(self) -> int:
        return len(self.terms.outputs)


@dataclass(frozen=True)
class ZPlus(Rule):
    """z⁺: only positive contributions, R_in = Σ_j x_i w_ij⁺ / Σ_i x_i w_ij⁺ · R_j (with the
    sign-aware extension x⁻ w⁻ for negative inputs); equals αβ with α=1, β=0."""

    stabilizer: float = 1e-6
    name: ClassVar[str] = "zplus"

    def __post_init__(self):
        _check("stabilizer", self.stabilizer, positive=True)

    def prepare(self, layer: Layer) -> Backward:
        w, b = layer.weight, layer.bias
        split = _SignSplit(layer)
        z = split.z([(0, w.clamp(min=0), _pos(b)), (1, w.clamp(max=0), None)])
        ratio = layer.output() / stabilize(z, self.stabilizer)
        return split.backward([ratio] * split.count())


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """α·(positive contributions, normalized) − β·(negative ones); α − β = 1."""

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6
    name: ClassVar[str] = "alpha_beta"

    def __post_init__(self):
        _check("alpha", self.alpha)
        _check("beta", self.beta)
        _check("stabilizer", self.stabilizer, positive=True)
        if abs(self.alpha - self.beta - 1) > 1e-9:
            raise MethodError(f"alpha - beta must be 1, got alpha={self.alpha}, beta={self.beta}")

    def prepare(self, layer: Layer) -> Backward:
        w, b = layer.weight, layer.bias
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        split = _SignSplit(layer)
        y = layer.output()
        z_pos = split.z([(0, wp, _pos(b)), (1, wn, None)])
        n_pos = split.count()
        z_neg = split.z([(0, wn, _neg(b)), (1, wp, None)])
        n_neg = split.count() - n_pos
        pos = self.alpha * y / stabilize(z_pos, self.stabilizer)
        neg = -self.beta * y / stabilize(z_neg, self.stabilizer)
        return split.backward([pos] * n_pos + [neg] * n_neg)


@dataclass(frozen=True)
class Gamma(Rule):
    """Weights w + γw⁺ for outputs that are positive, w + γw⁻ for negative ones (zennit's
    generalized γ rule, which also handles negative inputs)."""

    gamma: float = 0.25
    stabilizer: float = 1e-6
    name: ClassVar[str] = "gamma"

    def __post_init__(self):
        _check("gamma", self.gamma)
        _check("stabilizer", self.stabilizer, positive=True)

    def prepare(self, layer: Layer) -> Backward:
        w, b, g = layer.weight, layer.bias, self.gamma
        w_up, w_down = w + g * w.clamp(min=0), w + g * w.clamp(max=0)
        b_up = None if b is None else b + g * b.clamp(min=0)
        b_down = None if b is None else b + g * b.clamp(max=0)
        split = _SignSplit(layer)
        y = layer.output()
        z_pos = split.z([(0, w_up, b_up), (1, w_down, None)])
        n_pos = split.count()
        z_neg = split.z([(0, w_down, b_down), (1, w_up, None)])
        n_neg = split.count() - n_pos
        pos = y * (y > 0) / stabilize(z_pos, self.stabilizer)
        neg = y * (y < 0) / stabilize(z_neg, self.stabilizer)
        return split.backward([pos] * n_pos + [neg] * n_neg)


@dataclass(frozen=True)
class ZBox(Rule):
    """z^B for inputs bounded by [low, high]: R_in = x ⊙ Wᵀs − l ⊙ W⁺ᵀs − h ⊙ W⁻ᵀs with
    s = R_out / (Wx − W⁺l − W⁻h). `None` bounds: the model's pixels 0 and 1, normalized."""

    low: float | torch.Tensor | None = None
    high: float | torch.Tensor | None = None
    stabilizer: float = 1e-6
    name: ClassVar[str] = "zbox"
    proportional: ClassVar[bool] = False

    def __post_init__(self):
        _check("stabilizer", self.stabilizer, positive=True)

    def prepare(self, layer: Layer) -> Backward:
        if self.low is None or self.high is None:
            raise MethodError("zbox needs its bounds: ZBox(low=..., high=...)")
        x = layer.x
        w, b = layer.weight, layer.bias
        low, high = _bound(self.low, x), _bound(self.high, x)
        terms = _Terms(layer, [x, low, high])
        z = terms.add(0, w, b) - terms.add(1, w.clamp(min=0), _pos(b))
        z = z - terms.add(2, w.clamp(max=0), _neg(b))
        ratio = layer.output() / stabilize(z, self.stabilizer)

        def run(c: torch.Tensor) -> torch.Tensor:
            s = c * ratio
            g_x, g_low, g_high = terms.transpose([s, s, s])
            return x * g_x - low * g_low - high * g_high

        return run


def _bound(value: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A bound as a tensor of x's shape; a 1-D tensor of length C is per channel."""
    bound = torch.as_tensor(value).to(x)
    if bound.ndim == 1 and x.ndim > 2 and len(bound) == x.shape[1]:
        bound = bound.view(1, -1, *([1] * (x.ndim - 2)))
    try:
        return bound.expand_as(x)
    except RuntimeError as e:
        raise MethodError(
            f"zbox bound of shape {tuple(bound.shape)} does not fit the input {tuple(x.shape)}"
        ) from e


@dataclass(frozen=True)
class _OnesRule(Rule):
    """Rules that spread relevance by op(1, w', b') alone, ignoring the input's values."""

    stabilizer: float = 1e-6
    proportional: ClassVar[bool] = False

    def __post_init__(self):
        _check("stabilizer", self.stabilizer, positive=True)

    def params(self, layer: Layer) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def prepare(self, layer: Layer) -> Backward:
        terms = _Terms(layer, [torch.ones_like(layer.x)])
        z = terms.add(0, *self.params(layer))
        ratio = layer.output() / stabilize(z, self.stabilizer)
        return lambda c: terms.transpose([c * ratio])[0]


@dataclass(frozen=True)
class Flat(_OnesRule):
    """Relevance spread uniformly over each output's receptive field (all weights 1)."""

    name: ClassVar[str] = "flat"

    def params(self, layer: Layer) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.ones_like(layer.weight), None


@dataclass(frozen=True)
class WSquare(_OnesRule):
    """Relevance spread in proportion to the squared weights, w² (bias b² as in zennit)."""

    name: ClassVar[str] = "wsquare"

    def params(self, layer: Layer) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = layer.bias
        return layer.weight**2, None if b is None else b**2


@dataclass(frozen=True)
class Pass(Rule):
    """Pass-through: R_in = R_out (c_in = c_out · y / x); for shape-keeping layers."""

    name: ClassVar[str] = "pass"

    def prepare(self, layer: Layer) -> Backward:
        ratio = pass_ratio(layer.x, layer.output())
        return lambda c: c * ratio


def pass_ratio(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y / x, and 0 where x = 0 (no relevance there; y = f(0) = 0 for the layers this
    serves): c_in = c_out · ratio passes R through."""
    return (y / x).nan_to_num_(0.0, 0.0, 0.0)
