"""How each PyTorch operation moves what a tensor's units see of the input.

The receptive-field tracker (`cnnscan.receptive`) gives every tensor computed from the
input a `Geometry`: for the input's row and column axes, the tensor dim holding them and a
`Span` per axis (unit `u` sees pixels `[lo + u·step, hi + u·step]`). `propagate` applies the
rule of one op to it. An op without a rule, or used in a way a rule cannot state exactly,
gives `Unknown` with the reason, never a guess.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Span:
    """Input pixels seen along one axis: unit `u` sees `[lo + u·step, hi + u·step]`.

    `stride` is the distance in input pixels between neighbouring units (the product of the
    strides on the way, the "jump"); `step` equals it except where every unit sees the same
    pixels (after a global gate or pooling), where it is 0.
    """

    lo: float
    hi: float
    step: float
    stride: float

    @property
    def size(self) -> float:
        return self.hi - self.lo + 1

    def at(self, unit: int) -> tuple[float, float]:
        """First and last pixel seen by `unit` (ints where whole)."""
        low, high = self.lo + unit * self.step, self.hi + unit * self.step
        return tuple(int(v) if float(v).is_integer() else v for v in (low, high))  # type: ignore[return-value]

    def fold(self, units: int) -> Span:
        """What one unit sees after mixing `units` neighbours of this span: their hull."""
        return Span(self.lo, self.hi + (units - 1) * self.step, 0.0, self.stride)

    def window(self, kernel: int, stride: int, padding: float, dilation: int = 1) -> Span:
        """After a sliding window (convolution or pooling) along this axis."""
        return Span(
            self.lo - padding * self.step,
            self.hi + (dilation * (kernel - 1) - padding) * self.step,
            self.step * stride,
            self.stride * stride,
        )


@dataclass(frozen=True)
class Geometry:
    """For the input's row and column axes: the tensor dim holding them (None once folded
    away) and what each unit along it sees."""

    dims: tuple[int | None, int | None]
    spans: tuple[Span, Span]


@dataclass(frozen=True)
class Unknown:
    reason: str


Geo = Geometry | Unknown


class _Unsupported(Exception):
    """An operation whose effect on positions the rules cannot state exactly."""


def tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors(item)


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    values = tuple(value)
    return (values[0], values[0]) if len(values) == 1 else (values[-2], values[-1])


def _dims(value: Any, ndim: int) -> list[int] | None:
    """Normalized dims of a `dim=` argument; None means all dims."""
    if value is None or (isinstance(value, list | tuple) and len(value) == 0):
        return None
    values = [value] if isinstance(value, int) else list(value)
    return [v % ndim for v in values]


# -- rules: (args, kwargs, inputs with geometry, outputs) -> geometry per output --------------
OpRule = Callable[[tuple, dict, list[tuple[torch.Tensor, Geometry]], list[torch.Tensor]], list]


def _union(inputs: list[tuple[torch.Tensor, Geometry]], out: torch.Tensor) -> Geometry:
    """Element-wise with broadcasting: each unit sees the union of what the units it is
    computed from see; a size-1 (broadcast) or folded input axis reaches every unit."""
    dims: list[int | None] = []
    spans: list[Span] = []
    for axis in (0, 1):
        aligned, everywhere, aligned_dims, broadcast_dims = [], [], set(), set()
        for tensor, geometry in inputs:
            dim = geometry.dims[axis]
            span = geometry.spans[axis]
            if dim is None:
                everywhere.append(span)
                continue
            out_dim = dim + out.ndim - tensor.ndim
            if out_dim < 0:
                raise _Unsupported("a position axis disappears")
            if tensor.shape[dim] == out.shape[out_dim]:
                aligned.append(span)
                aligned_dims.add(out_dim)
            elif tensor.shape[dim] == 1:
                everywhere.append(span.fold(1))
                broadcast_dims.add(out_dim)
            else:
                raise _Unsupported("positions change size")
        if len(aligned_dims) > 1 or (not aligned_dims and len(broadcast_dims) > 1):
            raise _Unsupported("inputs hold positions in different dims")
        out_dim = next(iter(aligned_dims or broadcast_dims), None)
        units = out.shape[out_dim] if out_dim is not None else 1
        dims.append(out_dim)
        spans.append(_merge(aligned, everywhere, units))
    return Geometry((dims[0], dims[1]), (spans[0], spans[1]))


def _merge(aligned: list[Span], everywhere: list[Span], units: int) -> Span:
    candidates = aligned + everywhere
    stride = (aligned or everywhere)[0].stride
    if len({s.step for s in candidates}) == 1:
        lo = min(s.lo for s in candidates)
        hi = max(s.hi for s in candidates)
        return Span(lo, hi, candidates[0].step, stride)

    def covers(a: Span, b: Span) -> bool:
        return all(a.at(u)[0] <= b.at(u)[0] and a.at(u)[1] >= b.at(u)[1] for u in {0, units - 1})

    for span in candidates:
        if all(covers(span, other) for other in candidates):
            return replace(span, stride=stride)
    raise _Unsupported("inputs whose units step differently")


def _elementwise(args, kwargs, inputs, outputs):
    return [_union(inputs, out) for out in outputs]


def _single(inputs, args) -> tuple[torch.Tensor, Geometry]:
    """The one input with positions, which must be the data argument."""
    if len(inputs) != 1 or inputs[0][0] is not args[0]:
        raise _Unsupported("positions arrive through a non-data argument")
    return inputs[0]


def _windowed(
    tensor: torch.Tensor,
    geometry: Geometry,
    per_axis: Callable[[int, Span], Span],
    mixes_channels: bool,
) -> Geometry:
    """Apply a 2-D window op (on the last two dims) to the axes found there."""
    spans = list(geometry.spans)
    for axis, dim in enumerate(geometry.dims):
        if dim is None:
            continue
        if dim >= tensor.ndim - 2:
            spans[axis] = per_axis(dim - (tensor.ndim - 2), spans[axis])
        elif mixes_channels and dim == tensor.ndim - 3:
            spans[axis] = spans[axis].fold(tensor.shape[dim])
    return Geometry(geometry.dims, (spans[0], spans[1]))


def _conv2d(args, kwargs, inputs, outputs):
    tensor, geometry = _single(inputs, args)
    weight = _arg(args, kwargs, 1, "weight")
    kernel = tuple(weight.shape[-2:])
    stride = _pair(_arg(args, kwargs, 3, "stride", 1))
    dilation = _pair(_arg(args, kwargs, 5, "dilation", 1))
    padding = _arg(args, kwargs, 4, "padding", 0)
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":  # PyTorch pads total // 2 before, the rest after
        padding = tuple(dilation[i] * (kernel[i] - 1) // 2 for i in (0, 1))
    padding = _pair(padding)

    def per_axis(i: int, span: Span) -> Span:
        return span.window(kernel[i], stride[i], padding[i], dilation[i])

    return [_windowed(tensor, geometry, per_axis, mixes_channels=True) for _ in outputs]


def _pool(kernel_at: int, stride_at: int, padding_at: int | None, dilation_at: int | None):
    def rule(args, kwargs, inputs, outputs):
        tensor, geometry = _single(inputs, args)
        kernel = _pair(_arg(args, kwargs, kernel_at, "kernel_size"))
        stride_value = _arg(args, kwargs, stride_at, "stride")
        stride = kernel if stride_value in (None, [], ()) else _pair(stride_value)
        padding = _pair(_arg(args, kwargs, padding_at, "padding", 0)) if padding_at else (0, 0)
        dilation = _pair(_arg(args, kwargs, dilation_at, "dilation", 1)) if dilation_at else (1, 1)

        def per_axis(i: int, span: Span) -> Span:
            return span.window(kernel[i], stride[i], padding[i], dilation[i])

        return [_windowed(tensor, geometry, per_axis, mixes_channels=False) for _ in outputs]

    return rule


def _adaptive_pool(args, kwargs, inputs, outputs):
    """Window i covers [floor(i·n/m), ceil((i+1)·n/m)); when m does not divide n the windows
    differ in size: the largest is used and the step is n/m."""
    tensor, geometry = _single(inputs, args)
    sizes = tuple(tensor.shape[-2:])
    target = _arg(args, kwargs, 1, "output_size")
    target = (target, target) if isinstance(target, int) else tuple(target)
    target = tuple(sizes[i] if target[i] is None else target[i] for i in (0, 1))

    def per_axis(i: int, span: Span) -> Span:
        n, m = sizes[i], target[i]
        if n % m == 0:
            return span.window(n // m, n // m, 0)
        largest = max(math.ceil((j + 1) * n / m) - (j * n) // m for j in range(m))
        return Span(
            span.lo, span.hi + (largest - 1) * span.step, span.step * n / m, span.stride * n / m
        )

    return [_windowed(tensor, geometry, per_axis, mixes_channels=False) for _ in outputs]


def _pad(args, kwargs, inputs, outputs):
    tensor, geometry = _single(inputs, args)
    pad = list(_arg(args, kwargs, 1, "pad"))
    spans = list(geometry.spans)
    for axis, dim in enumerate(geometry.dims):
        if dim is None:
            continue
        from_last = tensor.ndim - 1 - dim
        if 2 * from_last < len(pad):
            before = pad[2 * from_last]
            span = spans[axis]
            spans[axis] = Span(
                span.lo - before * span.step, span.hi - before * span.step, span.step, span.stride
            )
    return [Geometry(geometry.dims, (spans[0], spans[1])) for _ in outputs]


def _fold_dims(geometry: Geometry, tensor: torch.Tensor, dims: list[int] | None) -> Geometry:
    """Every unit mixes all positions along `dims` (None: all dims); the dims stay."""
    spans = list(geometry.spans)
    for axis, dim in enumerate(geometry.dims):
        if dim is not None and (dims is None or dim in dims):
            spans[axis] = spans[axis].fold(tensor.shape[dim])
    return Geometry(geometry.dims, (spans[0], spans[1]))


def _mixing(dim_at: int, dim_name: str = "dim"):
    """Same shape out, each element depending on all elements along `dim` (softmax, ...)."""

    def rule(args, kwargs, inputs, outputs):
        tensor, geometry = _single(inputs, args)
        dims = _dims(_arg(args, kwargs, dim_at, dim_name), tensor.ndim)
        return [_fold_dims(geometry, tensor, dims) for _ in outputs]

    return rule


def _layer_norm(args, kwargs, inputs, outputs):
    tensor, geometry = _single(inputs, args)
    shape = _arg(args, kwargs, 1, "normalized_shape")
    count = 1 if isinstance(shape, int) else len(shape)
    dims = list(range(tensor.ndim - count, tensor.ndim))
    return [_fold_dims(geometry, tensor, dims) for _ in outputs]


def _group_norm(args, kwargs, inputs, outputs):
    tensor, geometry = _single(inputs, args)
    return [_fold_dims(geometry, tensor, list(range(1, tensor.ndim))) for _ in outputs]


def _batch_norm(args, kwargs, inputs, outputs):
    tensor, geometry = _single(inputs, args)
    if _arg(args, kwargs, 5, "training", False):  # batch statistics mix all positions
        return [_fold_dims(geometry, tensor, None) for _ in outputs]
    return [geometry for _ in outputs]


def _instance_norm(args, kwargs, inputs, outputs):
    tensor, geometry = _single(inputs, args)
    if _arg(args, kwargs, 5, "use_input_stats", True):
        return [_fold_dims(geometry, tensor, list(range(2, tensor.ndim))) for _ in outputs]
    return [geometry for _ in outputs]


def _reduction(dim_at: int = 1):
    def rule(args, kwargs, inputs, outputs):
        tensor, geometry = _single(inputs, args)
        dim_value = _arg(args, kwargs, dim_at, "dim")
        if isinstance(dim_value, bool):  # std(x, unbiased)
            dim_value = kwargs.get("dim")
        dims = _dims(dim_value, tensor.ndim)
        reduced = list(range(tensor.ndim)) if dims is None else dims
        keepdim = bool(kwargs.get("keepdim", _arg(args, kwargs, dim_at + 1, "keepdim", False)))
        folded = _fold_dims(geometry, tensor, reduced)
        new_dims = []
        for dim in geometry.dims:
            if dim is None or keepdim:
                new_dims.append(dim)
            elif dim in reduced:
                new_dims.append(None)
            else:
                new_dims.append(dim - sum(1 for r in reduced if r < dim))
        result = Geometry((new_dims[0], new_dims[1]), folded.spans)
        return [result for _ in outputs]

    return rule


def _max_min(args, kwargs, inputs, outputs):
    """torch.max(a, b) is element-wise; torch.max(x, dim) a reduction."""
    other = _arg(args, kwargs, 1, "other")
    if isinstance(other, torch.Tensor):
        return _elementwise(args, kwargs, inputs, outputs)
    return _reduction()(args, kwargs, inputs, outputs)


def _linear(args, kwargs, inputs, outputs):
    """Mixes the last dim completely."""
    tensor, geometry = _single(inputs, args)
    last = tensor.ndim - 1
    folded = _fold_dims(geometry, tensor, [last])
    dims = tuple(None if d == last else d for d in geometry.dims)
    return [Geometry(dims, folded.spans) for _ in outputs]  # type: ignore[arg-type]


def _reshape(args, kwargs, inputs, outputs):
    """view / reshape / flatten / (un)squeeze: a position dim that keeps its place in the
    memory order stays; one merged with others is folded (its positions mix from then on)."""
    tensor, geometry = _single(inputs, args)
    results = []
    for out in outputs:
        dims, spans = [], []
        for axis, dim in enumerate(geometry.dims):
            span = geometry.spans[axis]
            if dim is None:
                dims.append(None)
                spans.append(span)
                continue
            kind, new_dim = _reshape_map(tuple(tensor.shape), tuple(out.shape), dim)
            if kind == "split":
                raise _Unsupported("a position dim is split")
            dims.append(new_dim)
            spans.append(span if kind == "keep" else span.fold(tensor.shape[dim]))
        results.append(Geometry((dims[0], dims[1]), (spans[0], spans[1])))
    return results


def _reshape_map(before: tuple, after: tuple, dim: int) -> tuple[str, int | None]:
    size, prefix = before[dim], math.prod(before[:dim])
    running = 1
    for new_dim, new_size in enumerate(after):
        if running == prefix and new_size == size:
            return "keep", new_dim
        running *= new_size
    if size == 1:
        return "fold", None
    running = 1
    for new_size in after:
        if running <= prefix and prefix * size <= running * new_size and prefix % running == 0:
            return "fold", None
        running *= new_size
    return "split", None


def _permute_rule(order_of: Callable[[tuple, dict, int], list[int]]):
    def rule(args, kwargs, inputs, outputs):
        tensor, geometry = _single(inputs, args)
        order = [d % tensor.ndim for d in order_of(args, kwargs, tensor.ndim)]
        dims = tuple(None if d is None else order.index(d) for d in geometry.dims)
        return [Geometry(dims, geometry.spans) for _ in outputs]  # type: ignore[arg-type]

    return rule


def _permute_order(args, kwargs, ndim):
    dims = args[1:] if len(args) > 1 else kwargs["dims"]
    if len(dims) == 1 and isinstance(dims[0], list | tuple):
        dims = dims[0]
    return list(dims)


def _transpose_order(args, kwargs, ndim):
    a = _arg(args, kwargs, 1, "dim0") % ndim
    b = _arg(args, kwargs, 2, "dim1") % ndim
    order = list(range(ndim))
    order[a], order[b] = order[b], order[a]
    return order


def _stack(args, kwargs, inputs, outputs):
    (out,) = outputs
    at = _arg(args, kwargs, 1, "dim", 0) % out.ndim
    shifted = []
    for tensor, geometry in inputs:
        dims = tuple(None if d is None else d + (d >= at) for d in geometry.dims)
        shifted.append((tensor.unsqueeze(at), Geometry(dims, geometry.spans)))  # type: ignore[arg-type]
    return [_union(shifted, out)]


def _getitem(args, kwargs, inputs, outputs):
    """Basic indexing: slices along a position dim shift and stride it, an int picks one
    position, None adds a dim; tensor indices only along other dims."""
    tensor, geometry = _single(inputs, args)
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    advanced = [i for i in index if isinstance(i, list | torch.Tensor) and not _scalar(i)]
    if len(advanced) > 1:
        raise _Unsupported("several tensor indices")
    used = sum(1 for i in index if i is not None and i is not Ellipsis)
    if any(i is Ellipsis for i in index):
        at = next(k for k, i in enumerate(index) if i is Ellipsis)
        index = index[:at] + (slice(None),) * (tensor.ndim - used) + index[at + 1 :]
    index = index + (slice(None),) * (tensor.ndim - sum(1 for i in index if i is not None))
    mapping: dict[int, tuple[int | None, Span | None]] = {}
    spans_by_dim = {d: geometry.spans[a] for a, d in enumerate(geometry.dims) if d is not None}
    dim, out_dim = 0, 0
    for item in index:
        if item is None:
            out_dim += 1
            continue
        span = spans_by_dim.get(dim)
        if isinstance(item, slice):
            if span is not None:
                start, _, step = item.indices(tensor.shape[dim])
                span = Span(
                    span.lo + start * span.step,
                    span.hi + start * span.step,
                    span.step * step,
                    span.stride * step,
                )
            mapping[dim] = (out_dim, span)
            out_dim += 1
        elif isinstance(item, int) or _scalar(item):
            if span is not None:
                position = int(item) % tensor.shape[dim]
                low, high = span.at(position)
                span = Span(low, high, 0.0, span.stride)
            mapping[dim] = (None, span)
        else:
            if span is not None:
                raise _Unsupported("tensor indexing along a position dim")
            mapping[dim] = (out_dim, None)
            out_dim += 1
        dim += 1
    dims, spans = [], []
    for axis, d in enumerate(geometry.dims):
        if d is None:
            dims.append(None)
            spans.append(geometry.spans[axis])
        else:
            new_dim, span = mapping[d]
            dims.append(new_dim)
            spans.append(span)
    return [Geometry((dims[0], dims[1]), (spans[0], spans[1])) for _ in outputs]


def _scalar(item: Any) -> bool:
    return isinstance(item, torch.Tensor) and item.ndim == 0


_ELEMENTWISE = """add sub mul div true_divide floor_divide neg pow relu relu6 hardtanh sigmoid
tanh silu
gelu hardswish hardsigmoid elu selu celu leaky_relu rrelu mish softplus softsign prelu
logsigmoid tanhshrink hardshrink softshrink threshold glu dropout dropout1d dropout2d
dropout3d alpha_dropout feature_alpha_dropout clone contiguous to float double half
bfloat16 type type_as detach data clamp clamp_min clamp_max clip abs exp log sqrt rsqrt
square reciprocal where maximum minimum lerp addcmul addcdiv sign erf channel_shuffle
native_channel_shuffle masked_fill local_response_norm expand expand_as broadcast_to
repeat tile repeat_interleave cat concat concatenate chunk split tensor_split narrow cpu
cuda requires_grad_ fill_diagonal_ nan_to_num""".split()  # noqa: SIM905
_NO_DEPENDENCE = """zeros_like ones_like empty_like full_like rand_like randn_like
randint_like new_zeros
new_ones new_empty new_full new_tensor""".split()  # noqa: SIM905
_ALIASES = {
    "iadd": "add",
    "radd": "add",
    "isub": "sub",
    "rsub": "sub",
    "imul": "mul",
    "rmul": "mul",
    "truediv": "div",
    "rtruediv": "div",
    "itruediv": "div",
    "floordiv": "div",
    "rfloordiv": "div",
    "rpow": "pow",
    "ipow": "pow",
}
_RULES: dict[str, OpRule] = {name: _elementwise for name in _ELEMENTWISE}
_RULES.update(
    conv2d=_conv2d,
    max_pool2d=_pool(1, 2, 3, 4),
    max_pool2d_with_indices=_pool(1, 2, 3, 4),
    avg_pool2d=_pool(1, 2, 3, None),
    lp_pool2d=_pool(2, 3, None, None),
    adaptive_avg_pool2d=_adaptive_pool,
    adaptive_max_pool2d=_adaptive_pool,
    adaptive_max_pool2d_with_indices=_adaptive_pool,
    pad=_pad,
    constant_pad_nd=_pad,
    batch_norm=_batch_norm,
    instance_norm=_instance_norm,
    layer_norm=_layer_norm,
    rms_norm=_layer_norm,
    group_norm=_group_norm,
    softmax=_mixing(1),
    log_softmax=_mixing(1),
    normalize=_mixing(2),
    mean=_reduction(),
    sum=_reduction(),
    nansum=_reduction(),
    nanmean=_reduction(),
    amax=_reduction(),
    amin=_reduction(),
    std=_reduction(),
    var=_reduction(),
    prod=_reduction(),
    logsumexp=_reduction(),
    norm=_reduction(2),
    max=_max_min,
    min=_max_min,
    linear=_linear,
    view=_reshape,
    reshape=_reshape,
    view_as=_reshape,
    reshape_as=_reshape,
    flatten=_reshape,
    unflatten=_reshape,
    squeeze=_reshape,
    unsqueeze=_reshape,
    permute=_permute_rule(_permute_order),
    transpose=_permute_rule(_transpose_order),
    swapaxes=_permute_rule(_transpose_order),
    swapdims=_permute_rule(_transpose_order),
    stack=_stack,
    getitem=_getitem,
)
# Python wrappers whose __name__ is not the op's (boolean dispatch on return_indices).
_NAMES = {F.max_pool2d: "max_pool2d", F.adaptive_max_pool2d: "adaptive_max_pool2d"}


def op_name(func: Any) -> str:
    name = _NAMES.get(func) if _hashable(func) else None
    if name is None:
        name = getattr(func, "__name__", "") or ""
        if name == "__get__":  # a property such as Tensor.data / Tensor.T
            name = getattr(getattr(func, "__self__", None), "__name__", name)
    stripped = name.strip("_")  # __add__ -> add, relu_ (in place) -> relu
    return _ALIASES.get(stripped, stripped) if name.startswith("__") else stripped


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def propagate(
    name: str, args: tuple, kwargs: dict, inputs: list, outputs: list
) -> list[Geo | None]:
    """The geometry of each output of op `name`, given its inputs that carry one."""
    if name in _NO_DEPENDENCE:
        return [None] * len(outputs)
    unknown = next((g for _, g in inputs if isinstance(g, Unknown)), None)
    if unknown is not None:
        return [unknown] * len(outputs)
    rule = _RULES.get(name)
    if rule is None:
        return [Unknown(f"after `{name}`, which cnnscan has no receptive-field rule for")] * len(
            outputs
        )
    try:
        return rule(args, kwargs, inputs, outputs)
    except (_Unsupported, TypeError, ValueError, IndexError, KeyError) as e:
        return [Unknown(f"after `{name}`: {e}")] * len(outputs)
