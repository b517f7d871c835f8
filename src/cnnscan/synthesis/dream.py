"""DeepDream: amplify what a layer sees in a photo (Mordvintsev et al., 2015).

Gradient ascent on the photo's pixels for the layer's mean squared activation, with steps
normalized by the mean gradient magnitude and a random roll (jitter) before each step.
It runs over octaves: from a small copy of the photo up to full size, carrying the detail
dreamed so far up to the next octave, so patterns grow at several scales.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cnnscan.engine.folding import folded_working_copy
from cnnscan.engine.working_copy import memory_format_of, runnable
from cnnscan.errors import MethodError
from cnnscan.layers import LayerRef
from cnnscan.methods.options import count, generator, number
from cnnscan.models import Model, as_model
from cnnscan.synthesis.forward import probe
from cnnscan.synthesis.objectives import Objective, as_objective, layer_norm
from cnnscan.synthesis.result import Synthesis
from cnnscan.synthesis.run import ModelLike, evaluate, finite, photo_pixels, size_pair

_MIN_OCTAVE = 32  # pixels: smaller copies are too small for most networks' strides


def deepdream(
    model: ModelLike,
    image: Any,
    layer: str | LayerRef | None = None,
    *,
    objective: Objective | str | None = None,
    octaves: int = 4,
    octave_scale: float = 1.4,
    steps: int = 10,
    step_size: float = 0.01,
    jitter: int = 32,
    size: int | tuple[int, int] | None = None,
    seed: int | None = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    callback: Callable[[int, float], object] | None = None,
) -> Synthesis:
    """`image` dreamed at `layer` (or for any `objective`): `steps` normalized gradient
    steps per octave; each step moves pixels (in [0, 1]) by `step_size` on average.
    `size`: the output size (default: the model's input size). `callback(steps done,
    objective)` runs after every step; an exception raised in it stops the run."""
    model = as_model(model)
    if (layer is None) == (objective is None):
        raise MethodError("deepdream needs a layer (see `cnnscan layers`) or an objective")
    objective = layer_norm(layer) if objective is None else as_objective(objective)
    octaves = count("octaves", octaves)
    steps = count("steps", steps)
    octave_scale = number("octave_scale", octave_scale, positive=True)
    step_size = number("step_size", step_size, positive=True)
    jitter = count("jitter", jitter, minimum=0)
    if octave_scale <= 1 and octaves > 1:
        raise MethodError(f"octave_scale must be > 1 with several octaves, got {octave_scale}")
    device = torch.device(device) if device is not None else model.device
    full = size_pair(size) if size is not None else model.preprocessing.size
    sizes = [
        (round(full[0] / octave_scale**k), round(full[1] / octave_scale**k))
        for k in reversed(range(octaves))
    ]
    if octaves > 1 and min(sizes[0]) < _MIN_OCTAVE:
        raise MethodError(
            f"{octaves} octaves at scale {octave_scale} shrink the image to {sizes[0]}; use "
            f"fewer octaves or a larger size (the smallest octave must be >= {_MIN_OCTAVE} px)"
        )
    settings = {
        "layer": str(layer) if layer is not None else None,
        "octaves": octaves,
        "octave_scale": octave_scale,
        "steps": steps,
        "step_size": step_size,
        "jitter": jitter,
        "size": list(full),
        "seed": seed,
        "model": model.name,
    }
    began = time.perf_counter()
    gen = generator(seed)
    photo = photo_pixels(model, image, full, device)
    history: list[float] = []
    with runnable(model.module, device) as runner:
        initial = evaluate(runner, model, objective, photo, validate=True)
        runner = folded_working_copy(runner, model.module, [ref.name for ref in objective.layers])
        fmt = memory_format_of(runner)
        detail = torch.zeros((1, 3, *sizes[0]), device=device)
        bar = tqdm(
            total=octaves * steps, desc="deepdream", unit="step", disable=None if progress else True
        )
        with bar:
            for octave_size in sizes:
                base = _resize(photo, octave_size)
                pixels = (base + _resize(detail, octave_size)).clamp(0, 1)
                for _ in range(steps):
                    pixels, value = _ascend(
                        runner, model, objective, pixels, jitter, step_size, gen, fmt
                    )
                    history.append(finite(value, len(history)))
                    bar.set_postfix(objective=f"{history[-1]:.4g}", refresh=False)
                    bar.update(1)
                    if callback is not None:
                        callback(len(history), history[-1])
                detail = pixels - base
        final = evaluate(runner, model, objective, pixels)
    return Synthesis(
        pixels.cpu(),
        history,
        initial,
        final,
        objective.name,
        settings,
        time.perf_counter() - began,
    )


def _ascend(
    runner: torch.nn.Module,
    model: Model,
    objective: Objective,
    pixels: torch.Tensor,
    jitter: int,
    step_size: float,
    gen: torch.Generator,
    fmt: torch.memory_format,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One jittered, normalized gradient-ascent step: (new pixels, objective value)."""
    dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist() if jitter else (0, 0)
    shifted = pixels.roll((dy, dx), dims=(2, 3)).requires_grad_(True)
    x = model.preprocessing.normalize(shifted)
    value = objective(probe(runner, objective, x.contiguous(memory_format=fmt), x))
    (grad,) = torch.autograd.grad(value, shifted)
    grad = grad.roll((-dy, -dx), dims=(2, 3))
    step = step_size / grad.abs().mean().clamp_min(1e-12)
    return (pixels + step * grad).clamp(0, 1).detach(), value.detach()


def _resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    return F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
