"""Incremental inference: logits of many copies of one image that differ from it only in a box.

An occluded copy of an image equals the clean image everywhere except inside the patch, and
in each layer it differs only inside the patch's (growing) receptive field, until the first
global operation (Krypton, Nakandala et al., SIGMOD 2019). `PatchedForward` traces the model
with torch.fx, runs the clean image once keeping every intermediate, and then, for a batch of
patched copies, computes each local layer (convolution, pooling, padding, batch norm,
activations, residual sums, channel concatenation) only on the box of its output that the
patch affects, reading the needed halo from the cached clean input. Where a box would cover
most of a map, or at the first operation that is not local (global pooling, flatten, linear,
normalization over space), the copies become full tensors and the rest of the graph runs
normally. The result equals full forwards up to float rounding. Models that do not trace
(or that mutate values another layer still reads) get `None` from `patched_forward`: the
caller then runs plain forwards.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules import module as _module_globals

from cnnscan.engine.folding import CONV_ARGS, CONV_DEFAULTS
from cnnscan.engine.logits import check_logits, logits_of
from cnnscan.engine.tracing import symbolic_trace
from cnnscan.layers import ACTIVATION_MODULES

# A box covering at least this share of a map is computed as the full map (half keeps big
# patches cheap; docs/measurements.md has the numbers).
FULL_FRACTION = 0.5


@dataclass
class Boxed:
    """A batch of copies of one activation: equal to `clean` (1, C, H, W) except on each
    copy's box, whose values are `values[b]` (C, h, w) at rows top[b]:, columns left[b]:."""

    clean: torch.Tensor
    values: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor

    @property
    def size(self) -> tuple[int, int]:
        return self.values.shape[-2], self.values.shape[-1]

    def full(self) -> torch.Tensor:
        """The copies as a full tensor (B, C, H, W)."""
        batch = len(self.values)
        shape = (batch, *self.clean.shape[1:])
        out = torch.empty(
            shape,
            dtype=self.clean.dtype,
            device=self.clean.device,
            memory_format=_format_of(self.clean),
        )
        out.copy_(self.clean.expand(shape))  # a copy even for one copy: never the cache
        h, w = self.size
        rows = (self.top[:, None] + torch.arange(h, device=self.top.device))[:, :, None]
        cols = (self.left[:, None] + torch.arange(w, device=self.top.device))[:, None, :]
        images = torch.arange(batch, device=self.top.device)[:, None, None]
        out.permute(0, 2, 3, 1)[images, rows, cols] = self.values.permute(0, 2, 3, 1)
        return out

    def window(
        self, top: torch.Tensor, left: torch.Tensor, height: int, width: int, fill: float = 0.0
    ) -> torch.Tensor:
        """Each copy's values on rows top[b]:top[b]+height, columns left[b]:left[b]+width
        (B, C, height, width); positions outside the map read `fill` (a conv's padding).

        Built by two block copies per copy (the clean surroundings, then its box), which is
        faster on CPU than gathering the same windows with index tensors."""
        _, channels, full_h, full_w = self.clean.shape
        tops, lefts = top.tolist(), left.tolist()
        inside = min(tops) >= 0 and min(lefts) >= 0
        inside = inside and max(tops) + height <= full_h and max(lefts) + width <= full_w
        shape = (len(tops), height, width, channels)
        out = self.clean.new_empty(shape) if inside else self.clean.new_full(shape, fill)
        clean = self.clean[0].permute(1, 2, 0)
        values = self.values.permute(0, 2, 3, 1)
        h, w = self.size
        for b, (y, x, box_y, box_x) in enumerate(
            zip(tops, lefts, self.top.tolist(), self.left.tolist(), strict=True)
        ):
            _paste(out[b], clean, -y, -x, full_h, full_w)
            _paste(out[b], values[b], box_y - y, box_x - x, h, w)
        return out.permute(0, 3, 1, 2)


def _paste(out: torch.Tensor, source: torch.Tensor, y: int, x: int, h: int, w: int) -> None:
    """Copy `source` (h, w, C), placed at row y, column x of `out` (H, W, C), where they meet."""
    y0, x0 = max(y, 0), max(x, 0)
    y1, x1 = min(y + h, out.shape[0]), min(x + w, out.shape[1])
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = source[y0 - y : y1 - y, x0 - x : x1 - x]


def _format_of(x: torch.Tensor) -> torch.memory_format:
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1:
        return torch.channels_last
    return torch.contiguous_format


# -- what each graph node does, seen from the boxes ---------------------------------------------
_POINTWISE_MODULES = (*ACTIVATION_MODULES, nn.Identity)
_POINTWISE_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.hardtanh,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    F.softplus,
    torch.clamp,
    torch.clamp_min,
    torch.clamp_max,
}
_POINTWISE_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "clamp",
    "clamp_",
    "clamp_min",
    "clamp_min_",
    "clamp_max",
    "clamp_max_",
    "contiguous",
    "neg",
    "abs",
    "exp",
}
_BINARY_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
}
_BINARY_METHODS = {"add", "sub", "mul", "div"}
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
_SHAPE_METHODS = {"size", "dim"}


def _is_eval_batchnorm(module: nn.Module) -> bool:
    return type(module) is nn.BatchNorm2d and not module.training and module.track_running_stats


def _in_place(node: fx.Node, module: nn.Module | None) -> bool:
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).endswith("__")
    if node.op == "call_module":
        return bool(getattr(module, "inplace", False))
    if node.op == "call_function":
        return bool(node.kwargs.get("inplace")) or node.target in _INPLACE_OPERATORS
    return False


def _safe(graph: fx.Graph, root: nn.Module) -> bool:
    """True if no in-place op overwrites a value that another node reads later (or the
    input): then every op may run out of place on the boxes, as it does here."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        module = root.get_submodule(node.target) if node.op == "call_module" else None
        if not _in_place(node, module) or not node.args:
            continue
        target = node.args[0]
        if not isinstance(target, fx.Node) or target.op == "placeholder":
            return False
        if any(order[user] > order[node] for user in target.users if user is not node):
            return False
    return True


# -- the traced model ---------------------------------------------------------------------------
def _hooked(runner: nn.Module) -> bool:
    """Forward hooks may change outputs in ways boxes cannot follow: such models run whole."""
    if _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in runner.modules())


def patched_forward(runner: nn.Module, image: torch.Tensor) -> PatchedForward | None:
    """A `PatchedForward` for `image` (1, 3, H, W), or None if the model does not trace
    (tracing takes ~40 ms on the default model, so it is not cached: a changed model is
    always seen)."""
    if _hooked(runner):
        return None
    try:
        traced = symbolic_trace(runner)
    except Exception:  # any tracing failure (data-dependent control flow, ...): run whole
        return None
    if sum(n.op == "placeholder" for n in traced.graph.nodes) != 1 or not _safe(
        traced.graph, traced
    ):
        return None
    try:
        return PatchedForward(traced, image)
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return None


def _fetch(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _call(root: fx.GraphModule, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    if node.op == "call_module":
        return root.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "get_attr":
        return _fetch(root, node.target)
    raise ValueError(f"unexpected node {node.op}")


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class _Local:
    """A sliding-window op: output o reads input rows o·stride − pad_before + j·dilation."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad_before: tuple[int, int]
    pad_after: tuple[int, int]
    dilation: tuple[int, int]
    fill: float
    run: Callable[[torch.Tensor], torch.Tensor]  # the op with no padding on a window


def _padding(padding: Any, kernel: tuple[int, int], dilation: tuple[int, int]):
    """(before, after) pads per dimension, for int/tuple/'valid'/'same' padding."""
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        before = tuple(t // 2 for t in total)
        return before, tuple(t - b for t, b in zip(total, before, strict=True))
    pair = _pair(padding)
    return pair, pair


class PatchedForward:
    """Logits of copies of one image, each differing from it only inside one box."""

    def __init__(self, traced: fx.GraphModule, image: torch.Tensor):
        self.traced = traced
        self.nodes = list(traced.graph.nodes)
        self.clean: dict[fx.Node, torch.Tensor] = {}
        self.dependent: set[fx.Node] = set()
        self.boxed: set[str] = set()  # nodes computed on boxes so far (for inspection)
        self._run_clean(image)

    # -- the clean pass: every input-dependent spatial value, kept --------------------------
    def _run_clean(self, image: torch.Tensor) -> None:
        env: dict[fx.Node, Any] = {}
        dependent = self.dependent
        with torch.no_grad():
            for node in self.nodes:
                if node.op == "placeholder":
                    env[node] = image
                    dependent.add(node)
                    self.clean[node] = image
                    continue
                if node.op == "output":
                    self.logits = logits_of(fx.node.map_arg(node.args[0], env.__getitem__))
                    continue
                args = fx.node.map_arg(node.args, env.__getitem__)
                kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
                value = _call(self.traced, node, args, kwargs)
                env[node] = value
                if any(arg in dependent for arg in node.all_input_nodes):
                    dependent.add(node)
                    if isinstance(value, torch.Tensor) and value.ndim == 4:
                        self.clean[node] = value.clone(memory_format=_format_of(value))
        check_logits(self.logits)

    # -- patched copies --------------------------------------------------------------------
    def __call__(
        self, top: torch.Tensor, left: torch.Tensor, patches: torch.Tensor
    ) -> torch.Tensor:
        """Logits (B, classes) of the image with `patches[b]` (3, h, w) pasted at rows
        top[b]:, columns left[b]: (the box must lie inside the image)."""
        env: dict[fx.Node, Any] = {}
        full: dict[int, torch.Tensor] = {}  # materialized boxes, by id

        def plain(value: Any) -> Any:
            if isinstance(value, Boxed):
                if id(value) not in full:
                    full[id(value)] = value.full()
                return full[id(value)]
            return value

        with torch.no_grad():
            for node in self.nodes:
                if node.op == "placeholder":
                    image = self.clean[node]
                    top, left = top.to(image.device), left.to(image.device)
                    env[node] = self._boxed(node, patches.to(image), top, left)
                    continue
                if node.op == "output":
                    result = fx.node.map_arg(node.args[0], env.__getitem__)
                    result = fx.node.map_aggregate(result, plain)
                    logits = logits_of(result)
                    check_logits(logits)
                    return logits
                args = fx.node.map_arg(node.args, env.__getitem__)
                kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
                boxed = [a for a in (*_flat(args), *_flat(kwargs.values())) if isinstance(a, Boxed)]
                mixed = any(
                    n in self.dependent and isinstance(env[n], torch.Tensor)
                    for n in node.all_input_nodes
                )  # per-copy full tensors next to boxes: everything goes full
                value = None
                if boxed and not mixed:
                    value = self._boxed_op(node, args, kwargs, boxed)
                if value is None:
                    args = fx.node.map_aggregate(args, plain)
                    kwargs = fx.node.map_aggregate(kwargs, plain)
                    value = _call(self.traced, node, args, kwargs)
                elif isinstance(value, Boxed):
                    self.boxed.add(node.name)
                env[node] = value
        raise ValueError("the traced graph has no output")

    def _boxed(
        self, node: fx.Node, values: torch.Tensor, top: torch.Tensor, left: torch.Tensor
    ) -> Boxed | torch.Tensor:
        """A Boxed value of `node`, or the plain tensor when the box is the whole map."""
        clean = self.clean[node]
        if tuple(values.shape[-2:]) == tuple(clean.shape[-2:]):
            return values
        return Boxed(clean, values, top, left)

    def _boxed_op(self, node: fx.Node, args: tuple, kwargs: dict, boxed: list[Boxed]) -> Any:
        """The node's value computed on boxes, or None to run it on full tensors."""
        if node not in self.clean and not _is_shape_query(node):
            return None
        if _is_shape_query(node):
            return _call(self.traced, node, *_as_meta(args, kwargs))
        module = self.traced.get_submodule(node.target) if node.op == "call_module" else None
        source = args[0] if args else None
        if isinstance(source, Boxed) and len(boxed) == 1:
            if _is_pointwise(node, module, kwargs):
                values = source.values.clone() if _in_place(node, module) else source.values
                result = _call(self.traced, node, (values, *args[1:]), kwargs)
                return self._boxed(node, result, source.top, source.left)
            pad = _constant_pad(node, module, args, kwargs)
            if pad is not None:
                left_pad, top_pad = pad
                top, left = source.top + top_pad, source.left + left_pad
                return Boxed(self.clean[node], source.values, top, left)
            local = self._local(node, module, args, kwargs)
            if local is not None:
                return self._sliding(node, source, local)
        if _is_binary(node):
            return self._binary(node, args, kwargs)
        if _is_channel_cat(node, args, kwargs):
            return self._cat(node, args[0])
        return None

    def _sliding(self, node: fx.Node, source: Boxed, op: _Local) -> Any:
        """A convolution or pooling on each copy's affected output box only."""
        out_h, out_w = self.clean[node].shape[-2:]
        (top, height), (left, width) = (
            _affected(source.top, source.size[0], op, 0, out_h),
            _affected(source.left, source.size[1], op, 1, out_w),
        )
        if height * width >= FULL_FRACTION * out_h * out_w:  # the whole map
            top, left = torch.zeros_like(top), torch.zeros_like(left)
            height, width = out_h, out_w
        window = source.window(*_input_window(top, height, left, width, op), fill=op.fill)
        return self._boxed(node, op.run(window), top, left)

    def _binary(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        operands = list(args[:2])
        if len(operands) != 2 or not all(isinstance(v, Boxed) or _uniform(v) for v in operands):
            return None  # a constant that varies over space: run on full tensors
        boxes = [v for v in operands if isinstance(v, Boxed)]
        if any(b.clean.shape != boxes[0].clean.shape for b in boxes):
            return None
        if len(boxes) == 1:
            box = boxes[0]
            values = [box.values if v is box else v for v in operands]
            result = _call(self.traced, node, (*values, *args[2:]), kwargs)
            return self._boxed(node, result, box.top, box.left)
        a, b = boxes
        top, height = _union(a.top, a.size[0], b.top, b.size[0], a.clean.shape[-2])
        left, width = _union(a.left, a.size[1], b.left, b.size[1], a.clean.shape[-1])
        values = [v.window(top, left, height, width) for v in (a, b)]
        result = _call(self.traced, node, (*values, *args[2:]), kwargs)
        return self._boxed(node, result, top, left)

    def _cat(self, node: fx.Node, parts: list) -> Any:
        if not all(isinstance(p, Boxed) for p in parts):
            return None
        first = parts[0]
        top, height, left, width = first.top, first.size[0], first.left, first.size[1]
        for part in parts[1:]:
            top, height = _union(top, height, part.top, part.size[0], first.clean.shape[-2])
            left, width = _union(left, width, part.left, part.size[1], first.clean.shape[-1])
        values = [p.window(top, left, height, width) for p in parts]
        return self._boxed(node, torch.cat(values, dim=1), top, left)

    def _local(
        self, node: fx.Node, module: nn.Module | None, args: tuple, kwargs: dict
    ) -> _Local | None:
        """The sliding-window description of a conv or pooling node (None: not one)."""
        if node.op == "call_module" and type(module) is nn.Conv2d:
            if module.padding_mode != "zeros":
                return None
            kernel, dilation = module.kernel_size, module.dilation
            before, after = _padding(module.padding, kernel, dilation)
            weight, bias = module.weight, module.bias
            stride, groups = module.stride, module.groups
        elif node.op == "call_function" and node.target in (F.conv2d, torch.conv2d):
            bound = dict(CONV_DEFAULTS)
            bound.update(zip(CONV_ARGS, args, strict=False))
            bound.update(kwargs)
            weight, bias = bound["weight"], bound["bias"]
            if not isinstance(weight, torch.Tensor) or weight.ndim != 4:
                return None
            kernel = tuple(weight.shape[-2:])
            dilation, stride, groups = (
                _pair(bound["dilation"]),
                _pair(bound["stride"]),
                bound["groups"],
            )
            before, after = _padding(bound["padding"], kernel, dilation)
        elif node.op == "call_module" and type(module) is nn.MaxPool2d:
            if module.ceil_mode or module.return_indices:
                return None
            kernel, stride = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
            dilation = _pair(module.dilation)
            before = after = _pair(module.padding)
            run = _pool(F.max_pool2d, kernel, stride, dilation)
            return _Local(kernel, stride, before, after, dilation, float("-inf"), run)
        elif node.op == "call_module" and type(module) is nn.AvgPool2d:
            padding = _pair(module.padding)
            if (
                module.ceil_mode
                or module.divisor_override
                or (any(padding) and not module.count_include_pad)
            ):
                return None
            kernel, stride = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
            run = lambda x: F.avg_pool2d(x, kernel, stride)  # noqa: E731
            return _Local(kernel, stride, padding, padding, (1, 1), 0.0, run)
        else:
            return None
        stride, dilation = _pair(stride), _pair(dilation)

        def run(x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, weight, bias, stride, 0, dilation, groups)

        return _Local(tuple(kernel), stride, before, after, dilation, 0.0, run)


def _uniform(value: Any) -> bool:
    """A constant that is the same at every position of a map (a scalar, per channel)."""
    if not isinstance(value, torch.Tensor):
        return isinstance(value, int | float | bool)
    return value.ndim == 0 or (value.shape[-1] == 1 and (value.ndim == 1 or value.shape[-2] == 1))


def _pool(fn, kernel, stride, dilation):
    return lambda x: fn(x, kernel, stride, 0, dilation)


def _flat(values: Any) -> list:
    out: list = []
    fx.node.map_aggregate(values, out.append)
    return out


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    return (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) > 1
        and node.args[1] in ("shape", "ndim", "dtype", "device")
    )


def _as_meta(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def meta(value: Any) -> Any:
        if isinstance(value, Boxed):
            shape = (len(value.values), *value.clean.shape[1:])
            return torch.empty(shape, dtype=value.clean.dtype, device="meta")
        return value

    return fx.node.map_aggregate(args, meta), fx.node.map_aggregate(kwargs, meta)


def _is_pointwise(node: fx.Node, module: nn.Module | None, kwargs: dict) -> bool:
    if node.op == "call_module":
        if type(module) in (nn.Dropout, nn.Dropout2d):
            return not module.training
        return type(module) in _POINTWISE_MODULES or _is_eval_batchnorm(module)
    if node.op == "call_function":
        if node.target is F.dropout:
            return kwargs.get("training", True) is False
        return node.target in _POINTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in _POINTWISE_METHODS


def _constant_pad(node: fx.Node, module, args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """(left, top) offsets of a non-negative constant 2-D padding node, else None."""
    if node.op == "call_module" and type(module) in (nn.ZeroPad2d, nn.ConstantPad2d):
        pads = module.padding
    elif node.op == "call_function" and node.target is F.pad:
        pads = args[1] if len(args) > 1 else kwargs.get("pad")
        mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        if mode != "constant" or not isinstance(pads, tuple | list) or len(pads) not in (2, 4):
            return None
    else:
        return None
    pads = tuple(int(p) for p in pads)
    if min(pads) < 0:
        return None
    return pads[0], pads[2] if len(pads) == 4 else 0


def _is_binary(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _BINARY_FUNCTIONS
    return node.op == "call_method" and node.target in _BINARY_METHODS


def _is_channel_cat(node: fx.Node, args: tuple, kwargs: dict) -> bool:
    if node.op != "call_function" or node.target not in (torch.cat, torch.concat):
        return False
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    return dim in (1, -3) and isinstance(args[0], list | tuple)


def _affected(start: torch.Tensor, size: int, op: _Local, dim: int, out_size: int):
    """The output rows (per copy: start, common size) a box of input rows affects, moved
    inside the map so that every copy's box has the same size."""
    k, s, d, p = op.kernel[dim], op.stride[dim], op.dilation[dim], op.pad_before[dim]
    low = -torch.div(-(start + p - d * (k - 1)), s, rounding_mode="floor")
    high = torch.div(start + size - 1 + p, s, rounding_mode="floor")
    low, high = low.clamp_min(0), high.clamp_max(out_size - 1)
    length = max(1, int((high - low + 1).max()))
    length = min(length, out_size)
    return low.clamp(0, out_size - length), length


def _input_window(top, height, left, width, op: _Local):
    """The input window (top, left, height, width) an output box reads."""
    (ky, kx), (sy, sx), (dy, dx) = op.kernel, op.stride, op.dilation
    return (
        top * sy - op.pad_before[0],
        left * sx - op.pad_before[1],
        (height - 1) * sy + dy * (ky - 1) + 1,
        (width - 1) * sx + dx * (kx - 1) + 1,
    )


def _union(a_start, a_size, b_start, b_size, limit):
    """Per copy, the smallest common-size span covering both boxes, inside [0, limit)."""
    start = torch.minimum(a_start, b_start)
    end = torch.maximum(a_start + a_size, b_start + b_size)
    length = min(int((end - start).max()), limit)
    return start.clamp(0, limit - length), length
