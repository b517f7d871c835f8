"""zennit as a reference for LRP: attributions of one target, and canonizers that make
zennit handle the default model (EfficientNet-Lite0) the way cnnscan does."""

from __future__ import annotations

import torch
from efficientnet_lite_pytorch.model import MBConvBlock
from torch import nn
from zennit.canonizers import AttributeCanonizer, NamedMergeBatchNorm
from zennit.core import Composite
from zennit.layer import Sum


def zennit_lrp(module: nn.Module, x: torch.Tensor, targets: list[int], composite: Composite):
    """zennit's relevance of the input for each target (relevance at the output = the target
    logit), one forward and backward per target: (N, T, C, H, W)."""
    maps = []
    with composite.context(module) as hooked:
        for target in targets:
            leaf = x.clone().requires_grad_(True)
            out = hooked(leaf)
            selected = torch.zeros_like(out)
            selected[:, target] = out.detach()[:, target]
            (relevance,) = torch.autograd.grad(out, leaf, selected)
            maps.append(relevance)
    return torch.stack(maps, dim=1)


def _block_forward(self: MBConvBlock, inputs: torch.Tensor, drop_connect_rate=None):
    """MBConvBlock.forward (eval, no squeeze-excitation) with the skip connection as a Sum
    module, so that zennit's Norm rule splits relevance in proportion to the summands."""
    x = inputs
    if self._block_args.expand_ratio != 1:
        x = self._swish(self._bn0(self._expand_conv(inputs)))
    x = self._swish(self._bn1(self._depthwise_conv(x)))
    x = self._bn2(self._project_conv(x))
    args = self._block_args
    if self.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
        x = self.canonizer_sum(torch.stack([inputs, x], dim=-1))
    return x


def efficientnet_lite_canonizers(model: nn.Module) -> list:
    """Merge every conv's BatchNorm and route the skip connections through Sum modules."""
    pairs = [(("_conv_stem",), "_bn0"), (("_conv_head",), "_bn1")]
    for i, block in enumerate(model._blocks):
        if block._block_args.expand_ratio != 1:
            pairs.append(((f"_blocks.{i}._expand_conv",), f"_blocks.{i}._bn0"))
        pairs.append(((f"_blocks.{i}._depthwise_conv",), f"_blocks.{i}._bn1"))
        pairs.append(((f"_blocks.{i}._project_conv",), f"_blocks.{i}._bn2"))

    def attributes(name: str, module: nn.Module):
        if isinstance(module, MBConvBlock):
            return {"forward": _block_forward.__get__(module), "canonizer_sum": Sum()}
        return None

    return [NamedMergeBatchNorm(pairs), AttributeCanonizer(attributes)]
