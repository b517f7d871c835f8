"""Find layers by name, capture their outputs during a forward, and tabulate a model.

A layer is named by its dotted module name (`features.28`, `layer4`). A module that runs
more than once per forward (the default model's `_swish`) is named per call: `_swish@0`,
`_swish@1`. Asking for such a module without `@k` is an error listing its calls, so two
calls are never silently mixed.
"""

from __future__ import annotations

import contextvars
import copy
import difflib
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from cnnscan.errors import LayerError

_active_capture: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "cnnscan_capture", default=None
)

# Elementwise activation modules: their outputs are what "feature maps" usually means, and
# each output value depends on one input value only.
ACTIVATION_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
)

# Modules that only pool, drop or pass through: never the default layer to explain.
_NOT_FEATURE_LAYERS = (
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.Flatten,
)


@dataclass(frozen=True)
class LayerRef:
    """A module name and, for modules run several times per forward, which call."""

    name: str
    call: int | None = None

    @classmethod
    def parse(cls, text: str | LayerRef) -> LayerRef:
        if isinstance(text, LayerRef):
            return text
        name, sep, call = str(text).rpartition("@")
        if sep and call.isdigit():
            return cls(name, int(call))
        return cls(str(text))

    def __str__(self) -> str:
        return self.name if self.call is None else f"{self.name}@{self.call}"


def layer_names(root: nn.Module) -> list[str]:
    """Dotted names of every submodule, in definition order."""
    return [name for name, _ in root.named_modules() if name]


MAX_MESSAGE = 400  # characters of an unknown-layer error: a line, not a listing


def get_module(root: nn.Module, name: str) -> nn.Module:
    """The submodule called `name`, or a LayerError naming the ≤ 5 closest names."""
    modules = dict(root.named_modules())
    if name and name in modules:
        return modules[name]
    names = layer_names(root)
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    shown = name if len(name) <= 60 else name[:59] + "…"
    pointer = f"`cnnscan layers` lists all {len(names)} with their shapes"
    while True:
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        message = f"no layer named {shown!r}.{hint} {pointer}."
        if len(message) <= MAX_MESSAGE or not close:
            raise LayerError(message)
        close = close[:-1]


@dataclass(frozen=True)
class LayerRow:
    """One module call in execution order, for `cnnscan layers` and the report."""

    name: str
    type: str
    output_shape: tuple[int, ...] | None
    parameters: int
    depth: int
    is_leaf: bool
    passthrough: bool  # pooling to a fixed size, dropout, identity, flatten


class Capture:
    """Module outputs recorded during forwards run inside `capture(...)`, in completion order,
    each with the tensor's version counter at the time (a later in-place op changes it)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, nn.Module, torch.Tensor | None, int]] = []

    def outputs(self, name: str) -> list[torch.Tensor]:
        """Every output of module `name`, one per call."""
        return [out for called, _, out, _ in self.calls if called == name and out is not None]

    def __contains__(self, ref: str | LayerRef) -> bool:
        ref = LayerRef.parse(ref)
        return any(called == ref.name for called, _, _, _ in self.calls)

    def overwritten(self, ref: str | LayerRef) -> bool:
        """True if a later in-place op (`out += identity`, ReLU(inplace=True)) changed the
        recorded output of `ref` after its module returned it: capture it protected instead."""
        ref = LayerRef.parse(ref)
        versions = [
            (out, version)
            for called, _, out, version in self.calls
            if called == ref.name and out is not None
        ]
        chosen = versions if ref.call is None else versions[ref.call : ref.call + 1]
        return any(out._version != version for out, version in chosen)

    def __getitem__(self, ref: str | LayerRef) -> torch.Tensor:
        ref = LayerRef.parse(ref)
        outputs = self.outputs(ref.name)
        if not outputs:
            raise LayerError(
                f"layer {ref.name!r} did not run during the forward pass (or returned no tensor)"
            )
        if ref.call is None:
            if len(outputs) > 1:
                shapes = ", ".join(
                    f"{ref.name}@{i} {tuple(t.shape[1:])}" for i, t in enumerate(outputs)
                )
                raise LayerError(
                    f"layer {ref.name!r} runs {len(outputs)} times per forward; name one call: "
                    f"{shapes}"
                )
            return outputs[0]
        if ref.call >= len(outputs):
            raise LayerError(
                f"layer {ref.name!r} runs {len(outputs)} time(s) per forward; "
                f"{ref.name}@{ref.call} does not exist (calls count from 0)"
            )
        return outputs[ref.call]

    def rows(self) -> list[LayerRow]:
        """The layer table: every recorded call, named `name@k` where a module runs twice."""
        counts: dict[str, int] = {}
        for name, _, _, _ in self.calls:
            counts[name] = counts.get(name, 0) + 1
        seen: dict[str, int] = {}
        table = []
        for name, module, output, _ in self.calls:
            call = seen.get(name, 0)
            seen[name] = call + 1
            table.append(
                LayerRow(
                    name=name if counts[name] == 1 else f"{name}@{call}",
                    type=getattr(module, "layer_type", None) or type(module).__name__,
                    output_shape=tuple(output.shape[1:]) if output is not None else None,
                    parameters=sum(p.numel() for p in module.parameters()),
                    depth=name.count("."),
                    is_leaf=not any(True for _ in module.children()),
                    passthrough=isinstance(module, _NOT_FEATURE_LAYERS),
                )
            )
        return table


@contextmanager
def capture(
    root: nn.Module,
    layers: list[str | LayerRef] | None = None,
    protect: Collection[str] | None = None,
) -> Iterator[Capture]:
    """Record the outputs of `layers` (None: every submodule) during forwards run in this
    block (this thread only).

    Outputs stay in the autograd graph, so gradients with respect to them can be taken.
    The modules named in `protect` (default: all of an explicit `layers` list) hand the rest
    of the network a copy of their output, so that a later in-place op cannot overwrite the
    recorded tensor; recording every module (`layers=None`) protects none by default, and
    `Capture.overwritten` says when that matters. Hooks are removed on exit, also on errors.
    """
    if layers is None:
        modules = [(name, module) for name, module in root.named_modules() if name]
    else:
        names = dict.fromkeys(LayerRef.parse(layer).name for layer in layers)
        modules = [(name, get_module(root, name)) for name in names]
    protected = {name for name, _ in modules} if protect is None and layers else set(protect or ())
    result = Capture()
    token = object()
    handles = []
    try:
        for name, module in modules:

            def hook(module, _inputs, output, name=name):
                if _active_capture.get() is token:
                    tensor = output if isinstance(output, torch.Tensor) else None
                    version = tensor._version if tensor is not None else 0
                    result.calls.append((name, module, tensor, version))
                    if tensor is not None and name in protected:
                        return tensor.clone()
                return None

            handles.append(module.register_forward_hook(hook))
        reset = _active_capture.set(token)
        try:
            yield result
        finally:
            _active_capture.reset(reset)
    finally:
        for handle in handles:
            handle.remove()


_stopping: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "cnnscan_stop_after", default=None
)


class StopForward(Exception):
    """Raised inside a forward run in `stop_after(...)` once the layers it waits for ran."""


@contextmanager
def stop_after(root: nn.Module, refs: Collection[LayerRef], captured: Capture) -> Iterator[None]:
    """Within the block, a forward of `root` raises `StopForward` as soon as every call
    named in `refs` has been recorded in `captured` (a `capture` entered before this
    block): work that reads a middle layer skips the rest of the network (this thread
    only; hooks removed on exit, also on errors)."""
    token = object()

    def done() -> bool:
        return all(len(captured.outputs(ref.name)) > (ref.call or 0) for ref in refs)

    def hook(_module, _inputs, _output):
        if _stopping.get() is token and done():
            raise StopForward

    handles = [
        get_module(root, name).register_forward_hook(hook)
        for name in dict.fromkeys(ref.name for ref in refs)
    ]
    reset = _stopping.set(token)
    try:
        yield
    finally:
        _stopping.reset(reset)
        for handle in handles:
            handle.remove()


def trace_layers(root: nn.Module, x: torch.Tensor) -> list[LayerRow]:
    """Run one forward (no gradients) and list every module call in completion order."""
    with capture(root) as captured, torch.no_grad():
        root(x)
    return captured.rows()


def first_nonfinite(root: nn.Module, x: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """The first layer (in completion order, named as in the layer table) whose output on
    `x` holds NaN or ±Inf, with that output; None if every output is finite. One forward
    without gradients; outputs are recorded before any later in-place op can change them."""
    names = [name for name, _ in root.named_modules() if name]
    with capture(root, None, protect=names) as captured, torch.no_grad():
        root(x)
    for row, (_, _, output, _) in zip(captured.rows(), captured.calls, strict=True):
        floating = output is not None and output.is_floating_point()
        if floating and not bool(torch.isfinite(output).all()):
            return row.name, output
    return None


def default_layer(rows: list[LayerRow]) -> str:
    """The last layer (in completion order) with a spatial 4-D output that is not pooling,
    dropout or a pass-through: the usual CAM layer (e.g. `layer4`, `features`, `_swish@1`)."""
    for row in reversed(rows):
        shape = row.output_shape
        if (
            not row.passthrough
            and shape is not None
            and len(shape) == 3
            and shape[1] * shape[2] > 1
        ):
            return row.name
    raise LayerError(
        "the model has no layer with a spatial (N, C, H, W) output; pass layer= explicitly"
    )


class _PerCall(nn.Module):
    """Stands in for a module that runs several times per forward: call k of each forward
    goes through `calls[k]`, its own copy, so hook-based tools can tell the calls apart."""

    def __init__(self, module: nn.Module, n_calls: int):
        super().__init__()
        self.calls = nn.ModuleList(copy.deepcopy(module) for _ in range(n_calls))
        self.count = 0

    def forward(self, *args, **kwargs):
        module = self.calls[min(self.count, len(self.calls) - 1)]
        self.count += 1
        return module(*args, **kwargs)


def unshare(root: nn.Module, name: str, x: torch.Tensor) -> nn.Module:
    """A copy of `root` in which module `name` (run k times per forward on `x`) becomes one
    module per call, `name.calls.0` ... `name.calls.{k-1}`: for peer libraries that hook
    modules and cannot pick a call. The copy computes exactly what `root` computes."""
    with capture(root, [name]) as captured, torch.no_grad():
        root(x)
    clone = copy.deepcopy(root)
    parent_name, _, child = name.rpartition(".")
    parent = get_module(clone, parent_name) if parent_name else clone
    per_call = _PerCall(get_module(clone, name), len(captured.outputs(name)))
    setattr(parent, child, per_call)
    clone.register_forward_pre_hook(lambda _module, _inputs: setattr(per_call, "count", 0))
    return clone
