"""Cheap layers folded into the convolution next to them, for passes that read no layer:
each eval-mode BatchNorm into the convolution or linear layer before it, and each symmetric
zero padding into the convolution after it (the default model pads before every
convolution: a third of a forward+backward). `folded` gives a cached folded copy; the same
function and input gradients up to float rounding; the source model is never modified.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from cnnscan.engine.tracing import Tracer

_FOLDABLE_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FOLDABLE_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_folded: weakref.WeakKeyDictionary[nn.Module, dict[frozenset[str], nn.Module]] = (
    weakref.WeakKeyDictionary()
)
_folded_lock = threading.Lock()  # two threads asking at once fold once


class _LayerLeaves(Tracer):
    """Keep convolutions, linear layers and BatchNorm as single nodes, so that the pairs can
    be found, and hooked modules and the modules named in `keep` whole, so that hooks still
    see every call. Subclasses of convolutions (TF-style 'same' padding convs) are traced
    into, to reach their padding, unless `whole_subclasses` (for those that do not trace)."""

    def __init__(self, keep: frozenset[str] = frozenset(), whole_subclasses: bool = False):
        super().__init__()
        self.keep, self.whole_subclasses = keep, whole_subclasses

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        foldable = _FOLDABLE_BN + _FOLDABLE_INTO
        if type(module) in foldable or qualified_name in self.keep or _hooked(module):
            return True
        if self.whole_subclasses and isinstance(module, foldable):
            return True
        return super().is_leaf_module(module, qualified_name)


_TRACE_ERRORS = (fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError, ValueError)


def folded(module: nn.Module, keep: Iterable[str] = ()) -> nn.Module:
    """A cached folded copy of an eval-mode `module` (sharing every unchanged weight), or
    `module` itself when nothing folds or the model does not trace. The modules named in
    `keep` (layers a caller will hook) stay whole, as called modules at the same names."""
    keep = frozenset(keep)
    with _folded_lock:
        cache = _folded.setdefault(module, {})
        if keep not in cache:
            try:
                cache[keep] = fold_layers(module, keep)
            except _TRACE_ERRORS:
                cache[keep] = module
        return cache[keep]


def folded_working_copy(
    runner: nn.Module, source: nn.Module, keep: Iterable[str] = ()
) -> nn.Module:
    """`folded(runner, keep)` when `runner` is a private working copy of the user's `source`
    (`execution.runnable`); a borrowed `source` runs as it is, since its weights may change
    behind a cache."""
    return runner if runner is source else folded(runner, keep)


def fold_layers(module: nn.Module, keep: frozenset[str] = frozenset()) -> nn.Module:
    """Trace `module`; fold every BatchNorm (eval mode, running statistics) whose only input
    is a convolution or linear layer that runs once and feeds nothing else, then the zero
    paddings (`fold_zero_padding`); the modules named in `keep` are not traced into."""
    try:
        graph = _LayerLeaves(keep).trace(module)
    except _TRACE_ERRORS:  # e.g. a 'same' conv that computes its padding from the input size
        graph = _LayerLeaves(keep, whole_subclasses=True).trace(module)
    modules = dict(module.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    result = fx.GraphModule(module, graph)
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], _FOLDABLE_BN):
            continue
        norm = modules[node.target]
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if (
            not isinstance(source, fx.Node)
            or len(source.users) != 1
            or norm.training
            or norm.running_mean is None
            or _hooked(norm)
            or node.target in keep
        ):
            continue
        if source.op == "call_module":
            layer = modules[source.target]
            if (
                not isinstance(layer, _FOLDABLE_INTO)
                or calls[source.target] != 1
                or _hooked(layer)
                or source.target in keep
            ):
                continue
            _set_submodule(result, source.target, _fold(layer, norm))
            node.replace_all_uses_with(source)
            graph.erase_node(node)
        else:  # a convolution traced into: F.conv2d on the layer's parameters
            spec = conv_spec(result, source)
            if spec is None:
                continue
            scale, shift = _bn_affine(norm, spec["weight"].dtype)
            spec["weight"] = _like(spec["weight"] * scale.view(-1, 1, 1, 1), spec["weight"])
            bias = spec["bias"]
            spec["bias"] = shift if bias is None else bias * scale + shift
            _rebuild(result, [source, node], spec)
        count += 1
    count += fold_zero_padding(result, keep)
    if count == 0:
        return module
    graph.lint()
    result.recompile()
    return result


def _hooked(module: nn.Module) -> bool:
    """A hook may read or change the output: such a module keeps its own call."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _bn_affine(norm: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel with norm(y) = y · scale + shift for an eval BatchNorm."""
    scale = norm.running_var.to(dtype).add(norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.detach().to(dtype)
    shift = -norm.running_mean.to(dtype) * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach().to(dtype)
    return scale, shift


def _like(weight: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """`weight` in the memory format of `template` (channels-last stays channels-last)."""
    if template.ndim == 4 and template.is_contiguous(memory_format=torch.channels_last):
        return weight.contiguous(memory_format=torch.channels_last)
    return weight.contiguous()


def _fold(layer: nn.Module, norm: nn.Module) -> nn.Module:
    """A copy of `layer` computing norm(layer(x)) for an eval-mode BatchNorm."""
    weight = layer.weight.detach()
    scale, shift = _bn_affine(norm, weight.dtype)
    bias = layer.bias.detach() * scale + shift if layer.bias is not None else shift
    shape = (-1,) + (1,) * (weight.ndim - 1)
    out = copy.copy(layer)  # same class and settings, own parameter slots
    out._parameters = dict(layer._parameters)
    out._modules = dict(layer._modules)
    out.weight = nn.Parameter(_like(weight * scale.view(shape), weight), requires_grad=False)
    out.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return out


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    """Replace `root.<target>`; GraphModule owns fresh containers on the path, so the
    source model's own containers are not touched."""
    parent_name, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, module)


# -- zero padding into the convolution after it (traced graphs) ------------------------------
CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _parameter(root: fx.GraphModule, value: Any) -> torch.Tensor | None:
    """The tensor a get_attr node reads; None for None; ValueError for computed values."""
    if value is None:
        return None
    if isinstance(value, fx.Node) and value.op == "get_attr":
        found: Any = root
        for part in str(value.target).split("."):
            found = getattr(found, part)
        return found.detach()
    raise ValueError("a computed weight")


def conv_spec(root: fx.GraphModule, node: fx.Node) -> dict[str, Any] | None:
    """A zero-padded 2-D convolution's arguments by name, weight and bias as tensors
    (`F.conv2d` calls with parameter weights and `nn.Conv2d` modules); else None."""
    if node.op == "call_function" and node.target in (F.conv2d, torch.conv2d):
        spec = dict(CONV_DEFAULTS)
        spec.update(zip(CONV_ARGS, node.args, strict=False))
        spec.update(node.kwargs)
        try:
            spec["weight"], spec["bias"] = (_parameter(root, spec[k]) for k in ("weight", "bias"))
        except ValueError:
            return None
        return spec if isinstance(spec["weight"], torch.Tensor) else None
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        conv = root.get_submodule(node.target)
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
            return None
        bias = None if conv.bias is None else conv.bias.detach()
        return {
            "input": node.args[0],
            "weight": conv.weight.detach(),
            "bias": bias,
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "groups": conv.groups,
        }
    return None


def _rebuild(root: fx.GraphModule, chain: list[fx.Node], spec: dict[str, Any]) -> None:
    """Replace the nodes of `chain` (each used only by the next) by one F.conv2d."""
    graph = root.graph
    count = sum(1 for name, _ in root.named_buffers() if name.startswith("_cnnscan_fused"))
    args = []
    with graph.inserting_before(chain[0]):
        for name in CONV_ARGS:
            value = spec[name]
            if isinstance(value, torch.Tensor):
                root.register_buffer(f"_cnnscan_fused_{count}_{name}", value)
                value = graph.get_attr(f"_cnnscan_fused_{count}_{name}")
            args.append(value)
    with graph.inserting_after(chain[-1]):
        fused = graph.call_function(F.conv2d, tuple(args))
    chain[-1].replace_all_uses_with(fused)
    for node in reversed(chain):
        weights = [n for n in node.all_input_nodes if n.op == "get_attr"]
        graph.erase_node(node)
        for weight in weights:
            if not weight.users:
                graph.erase_node(weight)


def _zero_pad(root: fx.GraphModule, node: fx.Node) -> tuple[int, int] | None:
    """(top, left) of a symmetric, non-negative zero padding of the last two dimensions."""
    if node.op == "call_module" and len(node.args) == 1:
        module = root.get_submodule(node.target)
        if type(module) is nn.ZeroPad2d or (type(module) is nn.ConstantPad2d and module.value == 0):
            pads = module.padding
        else:
            return None
    elif node.op == "call_function" and node.target is F.pad:
        call = dict(zip(("input", "pad", "mode", "value"), node.args, strict=False))
        call.update(node.kwargs)
        if call.get("mode", "constant") != "constant" or call.get("value") not in (None, 0):
            return None
        pads = call.get("pad")
        if not isinstance(pads, tuple | list) or any(isinstance(p, fx.Node) for p in pads):
            return None
    else:
        return None
    if len(pads) != 4 or min(pads) < 0 or pads[0] != pads[1] or pads[2] != pads[3]:
        return None
    return int(pads[2]), int(pads[0])


def fold_zero_padding(root: fx.GraphModule, keep: frozenset[str] = frozenset()) -> int:
    """Fold each symmetric zero padding that only feeds an unpadded convolution into the
    convolution's own padding, in place on a private traced copy; returns how many. Hooked
    or kept modules keep their calls."""
    count = 0
    for node in list(root.graph.nodes):
        spec = conv_spec(root, node)
        pad = spec["input"] if spec is not None else None
        if not isinstance(pad, fx.Node) or len(pad.users) != 1:
            continue
        if spec["padding"] not in (0, (0, 0), [0, 0]):
            continue
        if any(_protected(root, n, keep) for n in (pad, node)):
            continue
        amount = _zero_pad(root, pad)
        if amount is None:
            continue
        spec["input"], spec["padding"] = pad.args[0], amount
        _rebuild(root, [pad, node], spec)
        count += 1
    root.recompile()
    return count


def _protected(root: fx.GraphModule, node: fx.Node, keep: frozenset[str]) -> bool:
    """A module call that must stay: kept by name or hooked."""
    if node.op != "call_module":
        return False
    return node.target in keep or _hooked(root.get_submodule(node.target))
