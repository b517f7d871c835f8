"""Inverted representation (Mahendran & Vedaldi, 2015): what a layer keeps of a photo.

Starting from noise, find an image whose features at `layer` match the photo's:
maximize −||Φ(x) − Φ₀||² / ||Φ₀||² − λ_α·mean|x|^α − λ_TV·TV_β(x), where x is the
normalized model input. Shallow layers give back the photo almost exactly; deep layers
keep the objects' parts and lose their arrangement and colours.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cnnscan.engine.working_copy import memory_format_of, runnable
from cnnscan.layers import LayerRef
from cnnscan.methods.options import number
from cnnscan.models import Model, as_model
from cnnscan.synthesis.forward import probe
from cnnscan.synthesis.objectives import alpha_norm, feature_match, layer_norm, total_variation
from cnnscan.synthesis.result import Synthesis
from cnnscan.synthesis.run import ModelLike, photo_pixels, synthesize


def invert(
    model: ModelLike,
    image: Any,
    layer: str | LayerRef,
    *,
    steps: int = 256,
    lr: float = 0.05,
    alpha: float = 6.0,
    alpha_weight: float = 1e-5,
    beta: float = 2.0,
    tv_weight: float = 0.2,
    param: str = "fft",
    decorrelate: bool = True,
    seed: int | None = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    callback: Callable[[int, float], object] | None = None,
) -> Synthesis:
    """An image, optimized from noise, whose features at `layer` match those of `image`
    (at the model's input size). No robustness transforms: features are compared
    position by position."""
    model = as_model(model)
    device = torch.device(device) if device is not None else model.device
    photo = photo_pixels(model, image, None, device)
    target = features(model, photo, layer, device)
    objective = (
        feature_match(layer, target)
        - number("alpha_weight", alpha_weight) * alpha_norm(alpha)
        - number("tv_weight", tv_weight) * total_variation(beta)
    )
    result = synthesize(
        model,
        objective,
        steps=steps,
        size=tuple(photo.shape[-2:]),
        lr=lr,
        param=param,
        decorrelate=decorrelate,
        transforms="none",
        seed=seed,
        device=device,
        progress=progress,
        callback=callback,
    )
    result.settings.update(
        layer=str(layer), alpha=alpha, alpha_weight=alpha_weight, beta=beta, tv_weight=tv_weight
    )
    return result


@torch.no_grad()
def features(
    model: Model, pixels: torch.Tensor, layer: str | LayerRef, device: torch.device
) -> torch.Tensor:
    """The activations of `layer` for `pixels` (B, 3, H, W) in [0, 1] (one full forward,
    so an ambiguous or unknown layer name gets its clear error)."""
    ref = LayerRef.parse(layer)
    objective = layer_norm(ref)
    with runnable(model.module, device) as runner:
        x = model.preprocessing.normalize(pixels.to(device))
        found = probe(
            runner,
            objective,
            x.contiguous(memory_format=memory_format_of(runner)),
            x,
            stop_early=False,
        )
        return found[ref].detach().clone()
