"""DeepLIFT's rescale rule, however a model calls its nonlinearities.

A forward of the batch [inputs; references] (the first half explained against the second,
row by row) inside `rescaled_nonlinearities()` runs every elementwise nonlinearity (ReLU in
every form, ReLU6 / hardtanh, ELU, leaky ReLU, SiLU, GELU, Mish, hardswish, hardsigmoid,
sigmoid, tanh, softplus) and 2-d max-pooling as a custom autograd function. Its backward is
the multiplier Δout/Δin of the pair (Shrikumar et al. 2017, eq. 3), the same for both halves;
where |Δin| < eps it is the function's own gradient, as in captum. Max-pooling takes captum's
rule (each half's argmax carries its share of Δout, the two shares added), with the shares
of overlapping windows summed where captum's `max_unpool` keeps one of them (and so loses
summation to delta). Linear operations (convolutions,
BatchNorm in eval mode, sums, average pooling) keep their gradient, which is their multiplier.
Products of two activations (squeeze-excitation gates, `x * sigmoid(x)` written out) take the
plain gradient, as in captum. Nothing on the model changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

EPS = 1e-10
_ALWAYS = -1  # an in-place form: no inplace flag to read

# function -> (its out-of-place form, index of the `inplace` argument, _ALWAYS, or None)
_ELEMENTWISE: dict[Any, tuple[Callable[..., torch.Tensor], int | None]] = {
    F.relu: (F.relu, 1),
    F.relu_: (F.relu, _ALWAYS),
    torch.relu: (torch.relu, None),
    torch.relu_: (torch.relu, _ALWAYS),
    torch.Tensor.relu: (torch.relu, None),
    torch.Tensor.relu_: (torch.relu, _ALWAYS),
    F.relu6: (F.relu6, 1),
    F.hardtanh: (F.hardtanh, 3),
    F.hardtanh_: (F.hardtanh, _ALWAYS),
    F.elu: (F.elu, 2),
    F.elu_: (F.elu, _ALWAYS),
    F.leaky_relu: (F.leaky_relu, 2),
    F.leaky_relu_: (F.leaky_relu, _ALWAYS),
    F.silu: (F.silu, 1),
    F.mish: (F.mish, 1),
    F.hardswish: (F.hardswish, 1),
    F.hardsigmoid: (F.hardsigmoid, 1),
    F.gelu: (F.gelu, None),
    F.softplus: (F.softplus, None),
    torch.sigmoid: (torch.sigmoid, None),
    torch.Tensor.sigmoid: (torch.sigmoid, None),
    torch.Tensor.sigmoid_: (torch.sigmoid, _ALWAYS),
    torch.tanh: (torch.tanh, None),
    torch.Tensor.tanh: (torch.tanh, None),
    torch.Tensor.tanh_: (torch.tanh, _ALWAYS),
}


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if len(x) % 2:
        raise RuntimeError("the rescale rule needs a batch [inputs; references] of even size")
    return x.chunk(2)


class _RescaleElementwise(torch.autograd.Function):
    """y = fn(x); backward: grad · Δy/Δx of the pair, fn's own gradient where |Δx| < eps."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], inplace):
        ctx.fn = fn
        ctx.x = x.detach().clone() if inplace else x.detach()
        y = fn(x)
        x_in, x_ref = _halves(ctx.x)
        y_in, y_ref = _halves(y)
        ctx.delta_in = x_in - x_ref
        ctx.ratio = (y_in - y_ref) / torch.where(ctx.delta_in.abs() < EPS, 1.0, ctx.delta_in)
        if inplace:
            ctx.mark_dirty(x)
            return x.copy_(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        small = (ctx.delta_in.abs() < EPS).repeat(2, *[1] * (grad.ndim - 1))
        out = grad * ctx.ratio.repeat(2, *[1] * (grad.ndim - 1))
        if bool(small.any()):
            with torch.enable_grad():
                x = ctx.x.requires_grad_(True)
                (local,) = torch.autograd.grad(ctx.fn(x), x, grad)
            out = torch.where(small, local, out)
        return out, None, None


class _RescaleMaxPool(torch.autograd.Function):
    """2-d max-pooling; backward: captum's DeepLIFT rule for max-pooling."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, params: tuple):
        y, indices = F.max_pool2d(x, *params, return_indices=True)
        ctx.save_for_backward(x, y, indices)
        ctx.params = params
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, y, indices = ctx.saved_tensors
        kernel, stride, padding, dilation, ceil_mode = ctx.params

        def scatter(values: torch.Tensor) -> torch.Tensor:  # max-pooling's own backward
            return torch.ops.aten.max_pool2d_with_indices_backward(
                values, x, kernel, stride, padding, dilation, ceil_mode, indices
            )

        y_in, y_ref = _halves(y)
        top = torch.maximum(y_in, y_ref)
        shares = scatter(grad * torch.cat([top - y_ref, y_in - top]))
        moved = sum(_halves(shares)).repeat(2, 1, 1, 1)
        x_in, x_ref = _halves(x)
        delta_in = (x_in - x_ref).repeat(2, 1, 1, 1)
        small = delta_in.abs() < EPS
        out = torch.where(small, scatter(grad), moved / torch.where(small, 1.0, delta_in))
        return out, None


def _pair(value: Any) -> list[int]:
    return list(value) if isinstance(value, tuple | list) else [value, value]


def _pool_params(args: tuple, kwargs: dict) -> tuple | None:
    """(kernel, stride, padding, dilation, ceil_mode) of an F.max_pool2d call, or None when
    it asks for the indices (then it runs as it is)."""
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    defaults = (None, None, 0, 1, False, False)
    values = [
        args[i + 1] if len(args) > i + 1 else kwargs.get(name, default)
        for i, (name, default) in enumerate(zip(names, defaults, strict=True))
    ]
    kernel, stride, padding, dilation, ceil_mode, return_indices = values
    if return_indices:
        return None
    stride = kernel if stride is None or stride == [] else stride
    return _pair(kernel), _pair(stride), _pair(padding), _pair(dilation), bool(ceil_mode)


class _RescaleInterceptor(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.max_pool2d and args and args[0].ndim == 4:
            params = _pool_params(args, kwargs)
            if params is not None:
                return _RescaleMaxPool.apply(args[0], params)
        form = _ELEMENTWISE.get(func)
        if form is None or not args:
            return func(*args, **kwargs)
        base, flag = form
        rest, options = list(args[1:]), {k: v for k, v in kwargs.items() if k != "inplace"}
        if flag == _ALWAYS:
            inplace = True
        elif flag is None:
            inplace = False
        else:
            inplace = bool(args[flag] if len(args) > flag else kwargs.get("inplace", False))
            rest = rest[: flag - 1]

        def fn(x: torch.Tensor) -> torch.Tensor:
            return base(x, *rest, **options)

        return _RescaleElementwise.apply(args[0], fn, inplace)


@contextmanager
def rescaled_nonlinearities() -> Iterator[None]:
    """Run a forward of [inputs; references] inside this block so that its backward gives
    DeepLIFT's multipliers."""
    with _RescaleInterceptor():
        yield
