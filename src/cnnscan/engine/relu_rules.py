"""Swap ReLU's backward rule (guided backprop, DeconvNet) however a model calls ReLU.

A `TorchFunctionMode` catches every ReLU form -- `nn.ReLU` (in-place or not), `F.relu`,
`torch.relu`, `Tensor.relu`, their in-place twins, and ReLU6 / `hardtanh(0, b)` -- and runs
it as one custom autograd function whose backward reads the rule from a shared `RuleSwitch`
at backward time. One forward therefore serves the standard gradient, guided backprop and
DeconvNet: set the switch, call `torch.autograd.grad`, repeat. Nothing on the model changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

ReluRule = Literal["standard", "guided", "deconv"]
RELU_RULES: tuple[ReluRule, ...] = ("standard", "guided", "deconv")


@dataclass
class RuleSwitch:
    """The backward rule every intercepted ReLU applies when gradients flow through it."""

    rule: ReluRule = "standard"

    @contextmanager
    def use(self, rule: ReluRule) -> Iterator[None]:
        """Apply `rule` for the backward passes run inside the block."""
        if rule not in RELU_RULES:
            raise ValueError(f"unknown ReLU rule {rule!r}; use one of {RELU_RULES}")
        previous, self.rule = self.rule, rule
        try:
            yield
        finally:
            self.rule = previous


class _SwitchableRelu(torch.autograd.Function):
    """clamp(x, 0, upper) forward; backward by the switch's rule (standard = autograd's)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, upper: float | None, switch: RuleSwitch, inplace: bool):
        passes = x > 0 if upper is None else (x > 0) & (x < upper)
        ctx.save_for_backward(passes)
        ctx.switch = switch
        if inplace:
            ctx.mark_dirty(x)
            return x.clamp_(0, upper)
        return x.clamp(0, upper)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (passes,) = ctx.saved_tensors
        rule = ctx.switch.rule
        if rule == "standard":
            grad_in = grad * passes
        elif rule == "guided":
            grad_in = grad.clamp(min=0) * passes
        else:  # deconv: the backward signal is rectified, the forward mask ignored
            grad_in = grad.clamp(min=0)
        return grad_in, None, None, None


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _relu_call(args: tuple, kwargs: dict, inplace_default: bool) -> tuple[float | None, bool]:
    return None, bool(_arg(args, kwargs, 1, "inplace", inplace_default))


def _relu6_call(args: tuple, kwargs: dict, inplace_default: bool) -> tuple[float | None, bool]:
    return 6.0, bool(_arg(args, kwargs, 1, "inplace", inplace_default))


def _hardtanh_call(args: tuple, kwargs: dict, inplace_default: bool) -> tuple[float | None, bool]:
    lower = _arg(args, kwargs, 1, "min_val", -1.0)
    if lower != 0:
        raise _NotARelu
    upper = float(_arg(args, kwargs, 2, "max_val", 1.0))
    return upper, bool(_arg(args, kwargs, 3, "inplace", inplace_default))


class _NotARelu(Exception):
    """A hardtanh whose lower bound is not 0: leave it alone."""


# function -> (how to read (upper bound, inplace) from its arguments, default inplace)
_RELU_FORMS: dict[Any, tuple[Any, bool]] = {
    F.relu: (_relu_call, False),
    F.relu_: (_relu_call, True),
    torch.relu: (_relu_call, False),
    torch.relu_: (_relu_call, True),
    torch.Tensor.relu: (_relu_call, False),
    torch.Tensor.relu_: (_relu_call, True),
    F.relu6: (_relu6_call, False),
    F.hardtanh: (_hardtanh_call, False),
    F.hardtanh_: (_hardtanh_call, True),
}


class _ReluInterceptor(TorchFunctionMode):
    def __init__(self, switch: RuleSwitch):
        super().__init__()
        self.switch = switch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        form = _RELU_FORMS.get(func)
        if form is not None:
            read, inplace_default = form
            try:
                upper, inplace = read(args, kwargs, inplace_default)
            except _NotARelu:
                return func(*args, **kwargs)
            return _SwitchableRelu.apply(args[0], upper, self.switch, inplace)
        return func(*args, **kwargs)


@contextmanager
def switchable_relus(switch: RuleSwitch | None = None) -> Iterator[RuleSwitch]:
    """Run a forward inside this block so that its ReLUs obey `switch` during backward."""
    switch = switch or RuleSwitch()
    with _ReluInterceptor(switch):
        yield switch
