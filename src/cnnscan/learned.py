"""What the network learned, read straight from it: convolution filters (weights) and
feature maps (activations of any layers, from one forward)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cnnscan.engine.working_copy import runnable
from cnnscan.errors import LayerError
from cnnscan.layers import ACTIVATION_MODULES, LayerRef, LayerRow, capture, get_module
from cnnscan.models import as_model
from cnnscan.scan import match_format


def conv_layers(model: Any) -> list[str]:
    """Names of the 2-D convolutions (nn.Conv2d and subclasses), in definition order."""
    module = as_model(model).module
    return [name for name, m in module.named_modules() if name and isinstance(m, nn.Conv2d)]


def filters(model: Any = None, layer: str | None = None) -> torch.Tensor:
    """The weights of a 2-D convolution, (out, in / groups, kh, kw): a copy, equal to the
    layer's `weight`. `layer=None` picks the first convolution (the one that sees pixels)."""
    model = as_model(model)
    convs = conv_layers(model)
    if not convs:
        raise LayerError("the model has no nn.Conv2d layer, so there are no filters to show")
    name = convs[0] if layer is None else LayerRef.parse(layer).name  # calls share weights
    module = get_module(model.module, name)
    if not isinstance(module, nn.Conv2d):
        more = f", … ({len(convs)} in all; `cnnscan layers` lists them)" if len(convs) > 12 else ""
        listing = ", ".join(convs[:12]) + more
        raise LayerError(
            f"layer {name!r} is a {type(module).__name__}, not a convolution, so it has no "
            f"filters. Convolution layers: {listing}"
        )
    return module.weight.detach().clone()


def feature_maps(
    model: Any,
    image: Any,
    layers: str | Sequence[str],
    *,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """The outputs of `layers` for `image`, from one forward without gradients:
    layer name -> tensor (N, C, H, W) (or whatever shape the layer returns), on the device.

    Name a module run several times per forward by call: `_swish@1` (see `cnnscan layers`).
    """
    model = as_model(model)
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise LayerError("feature_maps needs at least one layer name (see `cnnscan layers`)")
    refs = [LayerRef.parse(name) for name in names]
    for ref in refs:
        get_module(model.module, ref.name)  # unknown names fail before the forward
    device = torch.device(device) if device is not None else model.device
    x = model.inputs(image, device)
    with runnable(model.module, device) as runner, capture(runner, refs) as captured:
        with torch.no_grad():
            runner(match_format(x, runner))
        return {name: captured[ref].contiguous() for name, ref in zip(names, refs, strict=True)}


def top_channels(maps: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Channel indices of a (C, H, W) map ordered by mean activation, strongest first;
    the first `k` (all if None)."""
    if maps.ndim < 2:
        raise ValueError(f"expected channel maps (C, H, W), got shape {tuple(maps.shape)}")
    means = maps.detach().flatten(1).float().mean(dim=1)
    order = torch.argsort(means, descending=True, stable=True)
    return order if k is None else order[:k]


def depth_layers(rows: Sequence[LayerRow], count: int = 3) -> list[str]:
    """`count` layers at increasing depth for a quick look: spatial outputs of activation
    modules (else of any leaf module), evenly spaced and ending with the deepest."""
    spatial = [
        row
        for row in rows
        if row.is_leaf
        and not row.passthrough
        and row.output_shape is not None
        and len(row.output_shape) == 3
        and row.output_shape[1] * row.output_shape[2] > 1
    ]
    activations = [row for row in spatial if row.type in {a.__name__ for a in ACTIVATION_MODULES}]
    pool = activations if len(activations) >= count else spatial
    if not pool:
        return []
    picks = sorted({round((i + 1) * (len(pool) - 1) / count) for i in range(count)})
    return [pool[i].name for i in picks]
