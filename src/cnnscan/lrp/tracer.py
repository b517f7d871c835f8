"""One forward pass whose backward pass is LRP, without touching the model.

Inside `trace(...)` a TorchFunctionMode (thread-local, like `cnnscan.engine.relu_rules`) sees every
functional call the model makes. Each conv / linear / batch-norm call still computes its
usual output, but hands it on through a custom autograd function whose backward applies the
layer's rule; the forward values, hence the logits, are exactly the model's. A batch norm
that reads a conv/linear output directly is merged into it for the rule (weights W·s, bias
(b − μ)·s + β with s = γ/√(σ² + ε)); activations with f(0) = 0 (ReLU6, SiLU, GELU, ...)
pass relevance through unchanged, as ReLU's own gradient already does. Rules prepare their
target-independent work lazily, on the first backward that reaches them, so layers whose
output ends up unused (a conv merged with its batch norm) cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from cnnscan.errors import MethodError
from cnnscan.lrp.composites import RULE_NAMES, RuleMap
from cnnscan.lrp.rules import Pass, Rule, pass_ratio

# functional layer ops -> the module type they stand for when no module owns the weight
_AFFINE: dict[Any, type] = {
    torch.conv1d: nn.Conv1d,
    torch.conv2d: nn.Conv2d,
    torch.conv3d: nn.Conv3d,
    torch.conv_transpose1d: nn.ConvTranspose1d,
    torch.conv_transpose2d: nn.ConvTranspose2d,
    torch.conv_transpose3d: nn.ConvTranspose3d,
    F.linear: nn.Linear,
}
_SLOT_NAMES = ("input", "weight", "bias")

# activations with f(0) = 0 whose gradient is not already pass-through -> how to tell an
# in-place call: the position of their `inplace` argument, True (always), None (never)
_ACTIVATIONS: dict[Any, int | bool | None] = {
    F.relu6: 1,
    F.hardtanh: 3,
    F.hardtanh_: True,
    F.silu: 1,
    F.elu: 2,
    F.elu_: True,
    F.selu: 1,
    F.celu: 2,
    F.hardswish: 1,
    F.mish: 1,
    F.gelu: None,
    torch.tanh: None,
    F.tanh: None,
    torch.Tensor.tanh: None,
    torch.prelu: None,
}

# ops that only rearrange or zero-pad values: relevance rules that need the image itself
# (ZBox, Flat) follow the model input through them
_REARRANGE = {
    F.pad,
    torch.flatten,
    torch.Tensor.flatten,
    torch.Tensor.view,
    torch.reshape,
    torch.Tensor.reshape,
    torch.Tensor.contiguous,
}


@dataclass(frozen=True)
class _Call:
    """A recorded functional call, re-runnable with another input, weight and bias."""

    func: Callable
    args: tuple
    kwargs: dict
    slots: tuple[int, int, int]  # argument positions of input, weight, bias

    def get(self, slot: int) -> Any:
        index = self.slots[slot]
        return self.args[index] if index < len(self.args) else self.kwargs.get(_SLOT_NAMES[slot])

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        return self.args[index] if index < len(self.args) else self.kwargs.get(name, default)

    def stripped(self) -> _Call:
        """This call with its input, weight and bias emptied: what a layer keeps for its
        rule (no live activations)."""
        args, kwargs = list(self.args), dict(self.kwargs)
        for slot, index in enumerate(self.slots):
            if index < len(args):
                args[index] = None
            else:
                kwargs.pop(_SLOT_NAMES[slot], None)
        return replace(self, args=tuple(args), kwargs=kwargs)

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        args, kwargs = list(self.args), dict(self.kwargs)
        for slot, value in enumerate((x, weight, bias)):
            index = self.slots[slot]
            if index < len(args):
                args[index] = value
            else:
                kwargs[_SLOT_NAMES[slot]] = value
        return self.func(*args, **kwargs)


@dataclass
class LayerCall:
    """One layer call as rules see it (`cnnscan.lrp.rules.Layer`)."""

    name: str
    kind: type
    call: _Call
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    linear: bool
    to_layer: Callable[[torch.Tensor], torch.Tensor] | None = None  # model input -> layer input
    y: torch.Tensor | None = None  # the output handed on to the model
    versions: tuple[int, int] = (0, 0)  # of x and y when the call returned

    def op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        return self.call.run(x if self.to_layer is None else self.to_layer(x), weight, bias)

    def output(self) -> torch.Tensor:
        assert self.y is not None
        if self.y._version == self.versions[1]:
            return self.y.detach()
        with torch.no_grad():  # an in-place op (ReLU(inplace), `out += identity`) changed it
            return self.op(self.x, self.weight, self.bias)


class _Plan:
    """A layer's rule, prepared on the first backward that reaches it; `value` is the
    layer's output, held only until the autograd function has returned it. With
    `zero_bias` the rule sees the layer without its bias (its normalizer leaves the bias
    out, so the layer passes on all the relevance it receives) but with its real output."""

    def __init__(
        self, rule: Rule, layer: LayerCall, value: torch.Tensor | None, zero_bias: bool = False
    ):
        self.rule, self.layer, self.value, self.zero_bias = rule, layer, value, zero_bias
        self._run: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, c: torch.Tensor) -> torch.Tensor:
        if self._run is None:
            if self.layer.x._version != self.layer.versions[0]:
                raise MethodError(
                    f"the input of layer {self.layer.name!r} was modified in place after the "
                    "layer read it; LRP needs that input. Use an out-of-place op there."
                )
            layer = self.layer
            if self.zero_bias and layer.bias is not None:
                y = layer.output()
                layer = replace(layer, bias=None, y=y, versions=(layer.x._version, y._version))
            self._run = self.rule.prepare(layer)
        return self._run(c)


class _Relevance(torch.autograd.Function):
    """Forward: the layer's own output. Backward: the rule (c_in, or relevance for the sink)."""

    @staticmethod
    def forward(ctx: Any, plan: _Plan, source: torch.Tensor) -> torch.Tensor:
        ctx.plan = plan
        assert plan.value is not None
        return plan.value

    @staticmethod
    def backward(ctx: Any, c: torch.Tensor):
        return None, ctx.plan(c)


class _PassThrough(torch.autograd.Function):
    """Any shape-keeping op with R_in = R_out: backward c_in = c_out · y / x."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, func: Callable, args: tuple, kwargs: dict, inplace):
        if inplace:
            before = x.clone()
            func(*args, **kwargs)
            ctx.mark_dirty(x)
            out, x = x, before
        else:
            out = func(*args, **kwargs)
        ctx.save_for_backward(pass_ratio(x, out))
        return out

    @staticmethod
    def backward(ctx: Any, c: torch.Tensor):
        (ratio,) = ctx.saved_tensors
        return c * ratio, None, None, None, None


@dataclass
class Record:
    """What the traced forward did: rule per layer, merged batch norms."""

    rules: dict[str, str] = field(default_factory=dict)
    merged: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Produced:
    out: torch.Tensor
    version: int
    rule: Rule
    layer: LayerCall
    source: torch.Tensor


class _Tracer(TorchFunctionMode):
    def __init__(self, root: nn.Module, rules: RuleMap, inputs: torch.Tensor, sink: torch.Tensor):
        super().__init__()
        self.rules, self.inputs, self.sink = rules, inputs, sink
        self.owners = {
            id(t): (name, module)
            for name, module in root.named_modules()
            for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
        }
        # tensors made from the model input by `_REARRANGE` ops: tensor -> (it, input -> it)
        self.from_input: dict[int, tuple[torch.Tensor, Callable]] = {id(inputs): (inputs, _same)}
        self.produced: dict[int, _Produced] = {}  # conv/linear outputs, for merging batch norms
        self.record = Record()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _AFFINE:
            return self._affine(func, args, kwargs)
        if func is F.batch_norm:
            return self._batch_norm(args, kwargs)
        if func in _ACTIVATIONS:
            return self._activation(func, args, kwargs)
        if func in _REARRANGE:
            return self._rearrange(func, args, kwargs)
        return self._other(func, args, kwargs)

    # -- layers -------------------------------------------------------------------------
    def _affine(self, func, args, kwargs):
        call = _Call(func, args, kwargs, (0, 1, 2))
        x_in, weight, bias = call.get(0), call.get(1), call.get(2)
        if not _flows(x_in):
            return func(*args, **kwargs)
        name, kind = self._owner(weight, _AFFINE[func])
        rule = self._rule(name, kind, func, _depthwise(call, weight))
        with torch.no_grad():
            value = func(*args, **kwargs)
        layer = LayerCall(
            name or _label(func),
            kind,
            call.stripped(),
            x_in.detach(),
            weight.detach(),
            None if bias is None else bias.detach(),
            linear=True,
        )
        source = self._source(rule, layer, x_in)
        out = self._wrap(rule, layer, source, value)
        if not issubclass(_AFFINE[func], nn.modules.conv._ConvTransposeNd):
            self.produced[id(out)] = _Produced(out, out._version, rule, layer, source)
        return out

    def _batch_norm(self, args, kwargs):
        call = _Call(F.batch_norm, args, kwargs, (0, 3, 4))
        x_in = call.get(0)
        if not _flows(x_in):
            return F.batch_norm(*args, **kwargs)
        mean, var = call.arg(1, "running_mean"), call.arg(2, "running_var")
        weight, bias = call.get(1), call.get(2)
        eps = call.arg(7, "eps", 1e-5)
        with torch.no_grad():
            value = F.batch_norm(*args, **kwargs)
        name, kind = self._owner(weight if weight is not None else mean, nn.BatchNorm2d)
        producer = self.produced.get(id(x_in))
        mergeable = (
            producer is not None
            and producer.out is x_in
            and x_in._version == producer.version
            and not call.arg(5, "training", False)
            and mean is not None
            and var is not None
            and producer.layer.weight.shape[0] == mean.numel()
        )
        if mergeable:
            assert producer is not None
            scale = torch.rsqrt(var.detach() + eps)
            if weight is not None:
                scale = scale * weight.detach()
            w = producer.layer.weight
            b = -mean.detach() if producer.layer.bias is None else producer.layer.bias - mean
            fused = replace(
                producer.layer,
                weight=w * scale.view(-1, *([1] * (w.ndim - 1))),
                bias=b * scale + (0 if bias is None else bias.detach()),
                y=None,
            )
            self.record.merged.append(f"{producer.layer.name}+{name or 'batch_norm'}")
            return self._wrap(producer.rule, fused, producer.source, value)
        rule = self._rule(name, kind, F.batch_norm)
        channels = x_in.shape[1]
        layer = LayerCall(
            name or "batch_norm",
            kind,
            call.stripped(),
            x_in.detach(),
            x_in.new_ones(channels) if weight is None else weight.detach(),
            x_in.new_zeros(channels) if bias is None else bias.detach(),
            linear=False,
        )
        return self._wrap(rule, layer, self._source(rule, layer, x_in), value)

    def _rule(self, name: str | None, kind: type, func, depthwise: bool = False) -> Rule:
        rule = self.rules.lookup(name, kind, depthwise)
        if rule is None:
            raise MethodError(_no_rule(name or _label(func), kind))
        return rule

    def _source(self, rule: Rule, layer: LayerCall, x_in: torch.Tensor) -> torch.Tensor:
        """The tensor the rule's backward feeds: the layer input, or for rules that give
        relevance to zero inputs (ZBox, Flat) the relevance sink at the model input."""
        if rule.proportional:
            return x_in
        entry = self.from_input.get(id(x_in))
        if entry is None or entry[0] is not x_in:
            raise MethodError(
                f"the {rule.name} rule gives relevance to inputs that are zero, which cannot "
                f"flow further back, so it only fits the layer that reads the image; layer "
                f"{layer.name!r} reads an intermediate tensor. Map it to another rule."
            )
        layer.x, layer.to_layer = self.inputs.detach(), entry[1]
        return self.sink

    def _wrap(self, rule: Rule, layer: LayerCall, source: torch.Tensor, value: torch.Tensor):
        if isinstance(rule, Pass) and value.shape != layer.x.shape:
            raise MethodError(
                f"the pass rule needs a layer whose output has its input's shape; "
                f"{layer.name!r} maps {tuple(layer.x.shape)} to {tuple(value.shape)}"
            )
        plan = _Plan(rule, layer, value, self.rules.zero_bias)
        out = _Relevance.apply(plan, source)
        # an alias (same storage and version counter) without out's grad_fn: no cycle
        # out -> grad_fn -> plan -> out that would keep the graph alive after use
        plan.value, layer.y = None, out.detach()
        layer.versions = (layer.x._version, out._version)
        self.record.rules[layer.name] = rule.name
        return out

    def _owner(self, tensor: Any, default: type) -> tuple[str | None, type]:
        name, module = self.owners.get(id(tensor), (None, None))
        return name, default if module is None else type(module)

    # -- everything else --------------------------------------------------------------------
    def _activation(self, func, args, kwargs):
        x_in = args[0] if args else kwargs.get("input")
        if not _flows(x_in):
            return func(*args, **kwargs)
        where = _ACTIVATIONS[func]
        inplace = (
            where
            if isinstance(where, bool)
            else where is not None
            and bool(args[where] if where < len(args) else kwargs.get("inplace", False))
        )
        return _PassThrough.apply(x_in, func, args, kwargs, inplace)

    def _rearrange(self, func, args, kwargs):
        out = func(*args, **kwargs)
        x_in = args[0] if args else kwargs.get("input")
        entry = self.from_input.get(id(x_in))
        if entry is not None and entry[0] is x_in:
            before, rest = entry[1], args[1:]
            self.from_input[id(out)] = (out, lambda t: func(before(t), *rest, **kwargs))
        return out

    def _other(self, func, args, kwargs):
        """Ops without a rule; parameters that meet the signal here need one (e.g. pass)."""
        values = (*args, *kwargs.values())
        params = [v for v in values if isinstance(v, nn.Parameter)]
        if params:
            signal = [v for v in values if _flows(v) and not isinstance(v, nn.Parameter)]
            if signal:
                name, kind = self._owner(params[0], type(None))
                rule = self.rules.lookup(name, kind) if name is not None else None
                if isinstance(rule, Pass):
                    self.record.rules[name] = rule.name
                    inplace = getattr(func, "__name__", "").endswith("_")
                    return _PassThrough.apply(signal[0], func, args, kwargs, inplace)
                raise MethodError(_no_rule(name or _label(func), kind, func))
        return func(*args, **kwargs)


def _depthwise(call: _Call, weight: torch.Tensor) -> bool:
    """A convolution with one input channel per group (and more than one group)."""
    if call.func in (F.linear, *_TRANSPOSED) or weight.ndim < 3 or weight.shape[1] != 1:
        return False
    groups = call.arg(6, "groups", 1)
    return isinstance(groups, int) and groups > 1


_TRANSPOSED = (torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d)


def _flows(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _label(func: Any) -> str:
    return f"<{getattr(func, '__name__', str(func))} call>"


def _no_rule(name: str, kind: type, func: Any = None) -> str:
    used = f" (its parameters enter `{getattr(func, '__name__', func)}`)" if func else ""
    type_name = kind.__name__
    return (
        f"LRP has no rule for layer {name!r} of type {type_name}{used}. Map one, e.g. "
        f"rules={{{name!r}: 'epsilon'}} or rules={{{type_name}: 'pass'}}; rules: "
        f"{', '.join(RULE_NAMES)} (conv/linear/batch-norm layers take any, other layers "
        "'pass')."
    )


@contextmanager
def trace(
    root: nn.Module, rules: RuleMap, inputs: torch.Tensor, sink: torch.Tensor
) -> Iterator[Record]:
    """Run `root(inputs)` inside this block: backward passes of the outputs are LRP.

    `inputs` is the model input (a leaf that requires grad); `sink` (zeros, same shape,
    requires grad) collects the relevance of rules that are not proportional to the input.
    The relevance of the input is inputs ⊙ grad(inputs) + grad(sink).
    """
    tracer = _Tracer(root, rules, inputs, sink)
    with tracer:
        yield tracer.record
