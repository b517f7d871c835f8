"""Objectives: what an image is optimized for, as values that compose like numbers.

An objective maps a `Probe` (the activations, logits and input of one forward) to a scalar
to *maximize*. Objectives add, subtract and scale (`channel(L, 3) - 0.1 * total_variation()`)
and remember which layers they read, so the forward can stop after the deepest one.
Penalties (`l2`, `alpha_norm`, `total_variation`) return their positive size: subtract them.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cnnscan.errors import MethodError, TargetError
from cnnscan.layers import Capture, LayerRef


@dataclass
class Probe:
    """What one forward exposes to objectives.

    `input`: the model input before the robustness transforms (B, 3, H, W), normalized as
    the model expects; `logits` only if an objective asked for them.
    """

    input: torch.Tensor
    captured: Capture | None = None
    logits: torch.Tensor | None = None

    def __getitem__(self, layer: LayerRef) -> torch.Tensor:
        if self.captured is None:
            raise RuntimeError("this probe recorded no layers")
        return self.captured[layer]


Check = Callable[[Probe], None]


@dataclass(frozen=True)
class Objective:
    """A scalar to maximize, `fn(probe)`, with the layers it reads (and whether it needs the
    logits) and `checks` that validate indices against a first forward."""

    fn: Callable[[Probe], torch.Tensor]
    name: str
    layers: tuple[LayerRef, ...] = ()
    logits: bool = False
    checks: tuple[Check, ...] = field(default=(), repr=False)

    def __call__(self, probe: Probe) -> torch.Tensor:
        return self.fn(probe)

    def check(self, probe: Probe) -> None:
        """Raise a clear error if a layer, channel or class index does not exist."""
        for check in self.checks:
            check(probe)

    def _join(self, other: Objective, fn: Callable[[Probe], torch.Tensor], name: str):
        return Objective(
            fn,
            name,
            tuple(dict.fromkeys(self.layers + other.layers)),
            self.logits or other.logits,
            self.checks + other.checks,
        )

    def __add__(self, other: Objective | float) -> Objective:
        if isinstance(other, numbers.Real):
            return Objective(lambda p: self(p) + other, f"{self.name} + {other:g}", *self._meta())
        other = as_objective(other)
        return self._join(other, lambda p: self(p) + other(p), f"{self.name} + {other.name}")

    def __radd__(self, other: float) -> Objective:  # sum([...]) starts from 0
        return self if isinstance(other, numbers.Real) and other == 0 else self + other

    def __sub__(self, other: Objective | float) -> Objective:
        if isinstance(other, numbers.Real):
            return self + (-other)
        other = as_objective(other)
        return self._join(other, lambda p: self(p) - other(p), f"{self.name} - {_term(other)}")

    def __rsub__(self, other: float) -> Objective:
        return -self + other

    def __neg__(self) -> Objective:
        return Objective(lambda p: -self(p), f"-{_term(self)}", *self._meta())

    def __mul__(self, factor: float) -> Objective:
        if not isinstance(factor, numbers.Real):
            raise TypeError(f"objectives multiply by numbers only, not {type(factor).__name__}")
        factor = float(factor)
        return Objective(lambda p: factor * self(p), f"{factor:g}·{_term(self)}", *self._meta())

    __rmul__ = __mul__

    def __truediv__(self, divisor: float) -> Objective:
        if not isinstance(divisor, numbers.Real) or divisor == 0:
            raise TypeError(f"objectives divide by non-zero numbers only, not {divisor!r}")
        return self * (1.0 / float(divisor))

    def _meta(self) -> tuple:
        return self.layers, self.logits, self.checks


def _term(objective: Objective) -> str:
    """The name, in parentheses when it is a sum (so `2·(a + b)` reads right)."""
    return (
        f"({objective.name})"
        if " + " in objective.name or " - " in objective.name
        else objective.name
    )


def as_objective(spec: Objective | str | int) -> Objective:
    """An Objective from itself, "LAYER:K" (channel K of LAYER) or an int (a class logit)."""
    if isinstance(spec, Objective):
        return spec
    if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
        return class_logit(int(spec))
    if isinstance(spec, str):
        layer, sep, index = spec.rpartition(":")
        if sep and layer.strip() and index.strip().isdigit():
            return channel(layer.strip(), int(index))
    raise MethodError(
        f"cannot make an objective from {spec!r}; use 'LAYER:CHANNEL' (e.g. 'features.28:12'), "
        "a class id, or an objective such as channel(layer, k) / class_logit(k)"
    )


# -- checks ------------------------------------------------------------------------------
def _check_channel(ref: LayerRef, k: int, spatial: bool) -> Check:
    def check(probe: Probe) -> None:
        acts = probe[ref]
        if spatial and acts.ndim != 4:
            raise TargetError(
                f"neuron() needs a layer with a spatial (N, C, H, W) output; {ref} gives "
                f"{tuple(acts.shape[1:])}. Use channel() for it, or a convolutional layer"
            )
        if acts.ndim < 2:
            raise TargetError(f"layer {ref} has no channels (output {tuple(acts.shape)})")
        if not 0 <= k < acts.shape[1]:
            raise TargetError(
                f"channel {k} is out of range for layer {ref}: it has {acts.shape[1]} "
                f"channels (0..{acts.shape[1] - 1})"
            )

    return check


def _check_class(k: int) -> Check:
    def check(probe: Probe) -> None:
        n = probe.logits.shape[1]
        if not 0 <= k < n:
            raise TargetError(f"class {k} is out of range: the model has {n} classes (0..{n - 1})")

    return check


def _check_batch(name: str) -> Check:
    def check(probe: Probe) -> None:
        if len(probe.input) < 2:
            raise MethodError(f"{name} compares the images of a batch: use batch >= 2")

    return check


def _layer(layer: str | LayerRef) -> LayerRef:
    ref = LayerRef.parse(layer)
    if not ref.name:
        raise MethodError("an objective needs a layer name (see `cnnscan layers`)")
    return ref


def _index(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TargetError(f"{name} must be a whole number, got {value!r}")
    return int(value)


# -- objectives on layers and logits ----------------------------------------------------------
def channel(layer: str | LayerRef, k: int) -> Objective:
    """Mean activation of channel `k` of `layer` (over the batch and all positions)."""
    ref, k = _layer(layer), _index("channel", k)
    return Objective(
        lambda p: p[ref][:, k].mean(),
        f"channel({ref}:{k})",
        (ref,),
        False,
        (_check_channel(ref, k, spatial=False),),
    )


def channels(layer: str | LayerRef, ks: Sequence[int]) -> Objective:
    """Image i of the batch excites channel `ks[i]` of `layer` (mean over positions and
    images): one batched run draws several channels (run with `batch=len(ks)`)."""
    ref = _layer(layer)
    ks = [_index("channel", k) for k in ks]
    if not ks:
        raise MethodError("channels needs at least one channel")

    def value(p: Probe) -> torch.Tensor:
        acts = p[ref]
        if len(acts) != len(ks):
            raise MethodError(f"channels draws {len(ks)} channels: run with batch={len(ks)}")
        return acts[torch.arange(len(ks)), ks].mean()

    return Objective(
        value,
        f"channels({ref}:{','.join(map(str, ks))})",
        (ref,),
        False,
        tuple(_check_channel(ref, k, spatial=False) for k in dict.fromkeys(ks)),
    )


def neuron(layer: str | LayerRef, k: int, x: int | None = None, y: int | None = None) -> Objective:
    """Activation of channel `k` at one position, by default the centre (h // 2, w // 2)."""
    ref, k = _layer(layer), _index("channel", k)

    def value(p: Probe) -> torch.Tensor:
        acts = p[ref]
        row = acts.shape[2] // 2 if y is None else y
        col = acts.shape[3] // 2 if x is None else x
        return acts[:, k, row, col].mean()

    def check_position(p: Probe) -> None:
        h, w = p[ref].shape[2:]
        if (y is not None and not 0 <= y < h) or (x is not None and not 0 <= x < w):
            raise TargetError(
                f"position x={x}, y={y} is outside layer {ref}'s {h}×{w} map "
                f"(x in 0..{w - 1}, y in 0..{h - 1})"
            )

    checks = (_check_channel(ref, k, True), check_position)
    return Objective(value, f"neuron({ref}:{k})", (ref,), False, checks)


def class_logit(k: int) -> Objective:
    """The logit of class `k` (mean over the batch)."""
    k = _index("class", k)
    return Objective(
        lambda p: p.logits[:, k].mean(), f"class_logit({k})", (), True, (_check_class(k),)
    )


def layer_norm(layer: str | LayerRef) -> Objective:
    """Mean squared activation of a whole layer: DeepDream's objective."""
    ref = _layer(layer)
    return Objective(lambda p: p[ref].square().mean(), f"layer_norm({ref})", (ref,))


def feature_match(layer: str | LayerRef, target: torch.Tensor) -> Objective:
    """Minus ||Φ(x) − Φ₀||² / ||Φ₀||²: how close the features at `layer` are to `target`
    (Mahendran & Vedaldi's normalized feature loss, negated so that it is maximized)."""
    ref = _layer(layer)
    target = target.detach()
    norm = target.square().sum().clamp_min(1e-12)

    def value(p: Probe) -> torch.Tensor:
        acts = p[ref]
        return -(acts - target.to(acts)).square().sum() / norm

    def check(p: Probe) -> None:
        shape = tuple(p[ref].shape)
        if shape != tuple(target.shape):
            raise TargetError(
                f"features at {ref} have shape {shape}; the target has {tuple(target.shape)}: "
                "invert at the size the target was computed at"
            )

    return Objective(value, f"feature_match({ref})", (ref,), False, (check,))


def diversity(layer: str | LayerRef) -> Objective:
    """Minus the mean cosine similarity of the Gram matrices of the batch's images at
    `layer`: pushes a batch towards different ways of exciting the objective (lucid)."""
    ref = _layer(layer)

    def value(p: Probe) -> torch.Tensor:
        acts = p[ref]
        flat = acts.flatten(2) if acts.ndim > 2 else acts.unsqueeze(2)
        grams = F.normalize((flat @ flat.transpose(1, 2)).flatten(1), dim=1)
        similarity = grams @ grams.T
        n = len(grams)
        return -(similarity.sum() - similarity.diagonal().sum()) / n

    return Objective(value, f"diversity({ref})", (ref,), False, (_check_batch("diversity"),))


# -- penalties on the input (subtract them) ------------------------------------------------
def l2() -> Objective:
    """Mean squared value of the (normalized, zero-centred) input: Simonyan's L2 prior."""
    return Objective(lambda p: p.input.square().mean(), "l2")


def alpha_norm(alpha: float = 6.0) -> Objective:
    """Mean of |x|^α over the normalized input: keeps pixels in range (Mahendran & Vedaldi)."""
    if not alpha > 0:
        raise MethodError(f"alpha must be > 0, got {alpha!r}")
    return Objective(lambda p: p.input.abs().pow(alpha).mean(), f"alpha_norm({alpha:g})")


def total_variation(beta: float = 2.0) -> Objective:
    """Mean of ((Δx)² + (Δy)²)^(β/2) over the input: penalizes high-frequency noise."""
    if not beta > 0:
        raise MethodError(f"beta must be > 0, got {beta!r}")

    def value(p: Probe) -> torch.Tensor:
        x = p.input
        dx = x[..., :-1, 1:] - x[..., :-1, :-1]
        dy = x[..., 1:, :-1] - x[..., :-1, :-1]
        squared = dx.square() + dy.square()
        return (squared if beta == 2 else (squared + 1e-8).pow(beta / 2)).mean()

    return Objective(value, f"total_variation({beta:g})")
