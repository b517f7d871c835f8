"""Inference-time simplifications of a traced graph: fewer passes over memory, same function.

An eval-mode BatchNorm right after a convolution is an affine map per channel, so it folds
into the convolution's weights (w · s, (b − μ) · s + β with s = γ / √(σ² + ε)); a symmetric
zero padding right before a convolution becomes the convolution's own padding. Both are
memory-bound passes that cost a good part of a CPU forward of the default model. Results
equal the original up to float rounding. Only the private traced copy changes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

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


def _eval_batchnorm(root: fx.GraphModule, node: fx.Node) -> nn.BatchNorm2d | None:
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    bn = root.get_submodule(node.target)
    if type(bn) is nn.BatchNorm2d and not bn.training and bn.track_running_stats:
        return bn
    return None


def _zero_pad(root: fx.GraphModule, node: fx.Node) -> tuple[int, int] | None:
    """(top, left) of a symmetric, non-negative zero padding of the last two dimensions."""
    if node.op == "call_module" and len(node.args) == 1:
        module = root.get_submodule(node.target)
        if type(module) is nn.ZeroPad2d or (type(module) is nn.ConstantPad2d and module.value == 0):
            pads = module.padding
        else:
            return None
    elif node.op == "call_function" and node.target is F.pad and not node.kwargs:
        if len(node.args) != 2 or not isinstance(node.args[1], tuple | list):
            return None
        pads = node.args[1]
    else:
        return None
    if len(pads) != 4 or min(pads) < 0 or pads[0] != pads[1] or pads[2] != pads[3]:
        return None
    return int(pads[2]), int(pads[0])


def simplify(root: fx.GraphModule) -> None:
    """Fold eval BatchNorms into the convolutions before them and symmetric zero paddings
    into the convolutions after them, in place."""
    for node in list(root.graph.nodes):
        bn = _eval_batchnorm(root, node)
        conv = node.args[0] if bn is not None else None
        if not isinstance(conv, fx.Node) or len(conv.users) != 1:
            continue
        spec = conv_spec(root, conv)
        if spec is None:
            continue
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach()
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias.detach()
        bias = spec["bias"]
        spec["weight"] = spec["weight"] * scale.view(-1, 1, 1, 1)
        spec["bias"] = shift if bias is None else bias * scale + shift
        _rebuild(root, [conv, node], spec)
    for node in list(root.graph.nodes):
        spec = conv_spec(root, node)
        pad = spec["input"] if spec is not None else None
        if not isinstance(pad, fx.Node) or len(pad.users) != 1:
            continue
        if spec["padding"] not in (0, (0, 0), [0, 0]):
            continue
        amount = _zero_pad(root, pad)
        if amount is None:
            continue
        spec["input"], spec["padding"] = pad.args[0], amount
        _rebuild(root, [pad, node], spec)
    root.recompile()
