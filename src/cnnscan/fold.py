"""BatchNorm folded into the convolution or linear layer before it, for forwards without
gradients (Score-CAM, occlusion, metrics): the same function with one pass over the data
fewer per folded pair. Exact up to float rounding; the source model is never modified.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import fx, nn

from cnnscan.tracing import Tracer

_FOLDABLE_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FOLDABLE_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_folded: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


class _LayerLeaves(Tracer):
    """Keep convolutions (also subclasses such as TF-style 'same' padding convs), linear
    layers and BatchNorm as single nodes, so that the pairs can be found."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if isinstance(module, _FOLDABLE_BN + _FOLDABLE_INTO):
            return True
        return super().is_leaf_module(module, qualified_name)


def folded(module: nn.Module) -> nn.Module:
    """A cached BN-folded copy of an eval-mode `module` (sharing every unchanged weight), or
    `module` itself when nothing folds or the model does not trace."""
    if module not in _folded:
        try:
            result = fold_batchnorm(module)
        except (fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError, ValueError):
            result = module
        _folded[module] = result
    return _folded[module]


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Trace `module` and fold every BatchNorm (eval mode, running statistics) whose only
    input is a convolution or linear layer that runs once and feeds nothing else."""
    graph = _LayerLeaves().trace(module)
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
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not (isinstance(source, fx.Node) and source.op == "call_module"):
            continue
        layer, norm = modules[source.target], modules[node.target]
        if (
            not isinstance(layer, _FOLDABLE_INTO)
            or calls[source.target] != 1
            or len(source.users) != 1
            or norm.training
            or norm.running_mean is None
            or _hooked(layer)
            or _hooked(norm)
        ):
            continue
        _set_submodule(result, source.target, _fold(layer, norm))
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        count += 1
    if count == 0:
        return module
    graph.lint()
    result.recompile()
    return result


def _hooked(module: nn.Module) -> bool:
    """A hook may read or change the output: such a module keeps its own call."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _fold(layer: nn.Module, norm: nn.Module) -> nn.Module:
    """A copy of `layer` computing norm(layer(x)) for an eval-mode BatchNorm."""
    weight = layer.weight.detach()
    scale = norm.running_var.to(weight.dtype).add(norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.detach().to(weight.dtype)
    shift = -norm.running_mean.to(weight.dtype) * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach().to(weight.dtype)
    bias = layer.bias.detach() * scale + shift if layer.bias is not None else shift
    shape = (-1,) + (1,) * (weight.ndim - 1)
    new_weight = weight * scale.view(shape)
    if weight.is_contiguous(memory_format=torch.channels_last) and weight.ndim == 4:
        new_weight = new_weight.contiguous(memory_format=torch.channels_last)
    out = copy.copy(layer)  # same class and settings, own parameter slots
    out._parameters = dict(layer._parameters)
    out._modules = dict(layer._modules)
    out.weight = nn.Parameter(new_weight, requires_grad=False)
    out.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return out


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    """Replace `root.<target>`; GraphModule owns fresh containers on the path, so the
    source model's own containers are not touched."""
    parent_name, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, module)
