"""Receptive fields of every layer, computed from the operations the forward really runs.

One forward (no gradients) runs under a `TorchFunctionMode` that follows, for every tensor
derived from the input, which input pixels its units can see. Along each input axis, unit
`u` of a tensor dimension sees pixels `[lo + u·step, hi + u·step]` (unclipped: padding
counts, as in the usual receptive-field arithmetic). Convolutions and pooling widen and
stride that interval; element-wise ops, concatenations and residual adds take the union of
their inputs'; reductions, flattening into a linear layer and normalizations over positions
(squeeze-excitation gates, instance norm) make every unit see the whole span (step 0). The
rules live in `cnnscan.receptive.rules`; an operation without one marks its result "unknown" instead
of guessing. A module called several times gets one result per call (`name@k`), as in the
layer table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from cnnscan.engine.working_copy import runnable
from cnnscan.layers import LayerRow, capture
from cnnscan.models import as_model
from cnnscan.receptive.rules import Geo, Geometry, Span, Unknown, op_name, propagate, tensors


@dataclass(frozen=True)
class ReceptiveField:
    """The input region one unit of a layer's output can see (rows and columns), or why it
    is not known (`note`)."""

    rows: Span | None
    cols: Span | None
    note: str = ""

    @property
    def known(self) -> bool:
        return self.rows is not None and self.cols is not None

    @property
    def size(self) -> tuple[float, float] | None:
        """(height, width) in input pixels, unclipped; None if unknown."""
        if not self.known:
            return None
        return _whole(self.rows.size), _whole(self.cols.size)  # type: ignore[union-attr]

    @property
    def jump(self) -> tuple[float, float] | None:
        """Input pixels between neighbouring units (rows, columns): the product of strides."""
        if not self.known:
            return None
        return _whole(self.rows.stride), _whole(self.cols.stride)  # type: ignore[union-attr]

    @property
    def shared(self) -> bool:
        """True if every unit sees the same pixels (after global pooling or a global gate)."""
        return self.known and self.rows.step == 0 and self.cols.step == 0  # type: ignore[union-attr]

    def region(self, row: int = 0, col: int = 0) -> tuple[tuple[float, float], tuple[float, float]]:
        """Inclusive input pixel ranges ((top, bottom), (left, right)) seen by unit (row, col),
        unclipped (negative or beyond the image where padding is seen)."""
        if not self.known:
            raise ValueError(f"the receptive field is unknown ({self.note})")
        return self.rows.at(row), self.cols.at(col)  # type: ignore[union-attr]

    def describe(self) -> str:
        """The size for tables: '212', '7×15' (height×width where they differ) or '?'."""
        return _text(self.size)

    def describe_jump(self) -> str:
        return _text(self.jump)


def _whole(value: float) -> float:
    return int(value) if float(value).is_integer() else value


def _text(pair: tuple[float, float] | None) -> str:
    if pair is None:
        return "?"
    first, second = (str(v) if isinstance(v, int) else f"{v:.1f}" for v in pair)
    return first if first == second else f"{first}×{second}"


class _Tracker(TorchFunctionMode):
    """Follows the geometry of every tensor computed from the input during a forward."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self._current: dict[int, tuple[torch.Tensor, Geo]] = {}
        self._history: dict[int, list[tuple[int, Geo]]] = {}
        axis = Span(0.0, 0.0, 1.0, 1.0)
        self._set(x, Geometry((x.ndim - 2, x.ndim - 1), (axis, axis)))

    def _set(self, tensor: torch.Tensor, geometry: Geo) -> None:
        self._current[id(tensor)] = (tensor, geometry)  # holds the tensor: ids stay unique
        self._history.setdefault(id(tensor), []).append((tensor._version, geometry))

    def _get(self, tensor: torch.Tensor) -> Geo | None:
        entry = self._current.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else None

    def at(self, tensor: torch.Tensor, version: int) -> Geo | None:
        """The geometry `tensor` had when its version counter was `version`."""
        entry = self._current.get(id(tensor))
        if entry is None or entry[0] is not tensor:
            return None
        known = [g for v, g in self._history[id(tensor)] if v <= version]
        return known[-1] if known else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [(t, g) for t in tensors((args, kwargs)) if (g := self._get(t)) is not None]
        if not inputs:
            return out
        name = op_name(func)
        outputs = list(tensors(out))
        if name == "setitem" and len(inputs) > (self._get(args[0]) is not None):
            outputs = [args[0]]  # x[...] = value-with-positions: x now mixes them
        geometries = propagate(name, args, kwargs, inputs, outputs)
        for tensor, geometry in zip(outputs, geometries, strict=True):
            if geometry is not None:
                self._set(tensor, geometry)
        return out


def _field(geometry: Geo | None) -> ReceptiveField:
    if geometry is None:
        return ReceptiveField(None, None, "does not depend on the input, or ran outside PyTorch")
    if isinstance(geometry, Unknown):
        return ReceptiveField(None, None, geometry.reason)
    return ReceptiveField(*geometry.spans)


def trace_receptive_fields(
    root: nn.Module, x: torch.Tensor
) -> list[tuple[LayerRow, ReceptiveField]]:
    """One forward of `x` (no gradients) through `root`: every module call in completion
    order (the layer table's rows, `name@k` for repeated calls) with its receptive field."""
    x = x.detach().clone()
    with capture(root) as captured, torch.no_grad():
        tracker = _Tracker(x)
        with tracker:
            root(x)
    fields = [
        _field(tracker.at(tensor, version) if tensor is not None else None)
        for _, _, tensor, version in captured.calls
    ]
    return list(zip(captured.rows(), fields, strict=True))


def layer_geometry(
    model: Any = None, image: Any = None, *, device: torch.device | str | None = None
) -> list[tuple[LayerRow, ReceptiveField]]:
    """The layer table (every module call: name, type, output shape, parameters) with each
    call's receptive field, from one forward of `image` without gradients (default: a blank
    input of the model's size). A model built on PyTorch's "meta" device runs shape-only."""
    model = as_model(model)
    device = torch.device(device) if device is not None else model.device
    if image is None:
        x = torch.zeros((1, 3, *model.preprocessing.size), device=device)
    else:
        x = model.inputs(image, device)[:1]
    with runnable(model.module, device) as runner:
        return trace_receptive_fields(runner, x)


def receptive_fields(
    model: Any = None, image: Any = None, *, device: torch.device | str | None = None
) -> dict[str, ReceptiveField]:
    """Receptive field of every layer call, by layer name (`name@k` for a module called
    several times), from one forward of `image` (default: a blank input of the model's size).

    Sizes are in input pixels and unclipped, the usual convention (VGG16's conv5_3 sees
    196 × 196 pixels, pool5 212 × 212). See `layer_geometry` for how it runs.
    """
    return {row.name: field for row, field in layer_geometry(model, image, device=device)}
