"""`synthesize`: optimize an image for an objective (activation maximization), and the
class images of Simonyan et al. built on it.

Each step: parameterized image -> pixels in [0, 1] -> random robustness transforms -> the
model's own normalization -> a forward that stops after the objective's deepest layer ->
Adam step on the image's parameters. The model runs as a working copy whose parameters
need no gradient, so the user's model is never touched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cnnscan.engine.folding import folded_working_copy
from cnnscan.engine.working_copy import memory_format_of, runnable
from cnnscan.errors import MethodError, ModelError
from cnnscan.methods.options import count, generator, number
from cnnscan.models import Model, ModelLike, as_model
from cnnscan.optimizers import Adam
from cnnscan.synthesis.forward import probe
from cnnscan.synthesis.objectives import (
    Objective,
    as_objective,
    class_logit,
    l2,
    total_variation,
)
from cnnscan.synthesis.param import image_param
from cnnscan.synthesis.result import Synthesis
from cnnscan.synthesis.transforms import Transform, resolve
from cnnscan.targets import class_id_of


def synthesize(
    model: ModelLike,
    objective: Objective | str | int,
    *,
    steps: int = 256,
    size: int | tuple[int, int] = 224,
    lr: float = 0.05,
    param: str = "fft",
    decorrelate: bool = True,
    transforms: str | Sequence[Transform] | None = "standard",
    batch: int = 1,
    init: Any = None,
    seed: int | None = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    callback: Callable[[int, float], object] | None = None,
) -> Synthesis:
    """An image (or `batch` of images) that maximizes `objective` on `model`.

    `objective`: an `Objective` (compose with +, -, *), "LAYER:K" (channel K) or a class id.
    `param`: "fft" (Fourier, 1/f-scaled) or "pixel"; `decorrelate` mixes colours with
    ImageNet's colour correlation. `transforms`: "standard" (pad, jitter, scale, rotate as in
    lucent), "jitter", "none" or a list. `init`: start from a picture instead of noise.
    Same `seed` -> bitwise the same image on the same machine. `callback(steps done,
    objective)` runs after every step (progress in a GUI); an exception raised in it stops
    the run and propagates.
    """
    model = as_model(model)
    objective = as_objective(objective)
    steps = count("steps", steps)
    batch = count("batch", batch)
    height, width = size_pair(size)
    lr = number("lr", lr, positive=True)
    transform = resolve(transforms)
    device = torch.device(device) if device is not None else model.device
    settings = {
        "steps": steps,
        "size": [height, width],
        "lr": lr,
        "param": param,
        "decorrelate": decorrelate,
        "transforms": transforms if isinstance(transforms, str | None) else "custom",
        "batch": batch,
        "seed": seed,
        "model": model.name,
    }
    began = time.perf_counter()
    gen = generator(seed)
    image = image_param(
        param, (batch, 3, height, width), decorrelate=decorrelate, generator=gen, device=device
    )
    if init is not None:
        start = photo_pixels(model, init, (height, width), device)
        image.set_pixels(start.expand(batch, -1, -1, -1))
    optimizer = Adam(image.parameters, lr=lr)
    history: list[float] = []
    bar = tqdm(
        total=steps, desc=objective.name[:40], unit="step", disable=None if progress else True
    )
    with runnable(model.module, device) as runner, bar:
        initial = evaluate(runner, model, objective, image().detach(), validate=True)
        runner = folded_working_copy(runner, model.module, [ref.name for ref in objective.layers])
        fmt = memory_format_of(runner)
        for step in range(steps):
            pixels = image()
            seen = model.preprocessing.normalize(transform(pixels, gen))
            found = probe(
                runner,
                objective,
                seen.contiguous(memory_format=fmt),
                model.preprocessing.normalize(pixels),
            )
            value = objective(found)
            optimizer.zero_grad()
            (-value).backward()
            optimizer.step()
            history.append(finite(value, step))
            bar.set_postfix(objective=f"{history[-1]:.4g}", refresh=False)
            bar.update(1)
            if callback is not None:
                callback(step + 1, history[-1])
        final_pixels = image().detach()
        final = evaluate(runner, model, objective, final_pixels)
    return Synthesis(
        final_pixels.cpu(),
        history,
        initial,
        final,
        objective.name,
        settings,
        time.perf_counter() - began,
    )


def class_image(
    model: ModelLike,
    class_id: int | str,
    *,
    steps: int = 64,
    size: int | tuple[int, int] = 224,
    lr: float = 0.05,
    l2_weight: float = 0.1,
    tv_weight: float = 1.0,
    param: str = "fft",
    decorrelate: bool = True,
    transforms: str | Sequence[Transform] | None = "standard",
    seed: int | None = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    callback: Callable[[int, float], object] | None = None,
) -> Synthesis:
    """A class model (Simonyan et al.): an image maximizing the logit of `class_id` (an id or
    a class name) minus an L2 and a total-variation penalty. `param="pixel",
    transforms="none"` is the paper's setting; the default Fourier parameterization with
    robustness transforms trades the noise for the class's textures and parts, in 64 steps."""
    model = as_model(model)
    k = class_id_of(class_id, model.labels)
    objective = (
        class_logit(k)
        - number("l2_weight", l2_weight) * l2()
        - number("tv_weight", tv_weight) * total_variation()
    )
    result = synthesize(
        model,
        objective,
        steps=steps,
        size=size,
        lr=lr,
        param=param,
        decorrelate=decorrelate,
        transforms=transforms,
        seed=seed,
        device=device,
        progress=progress,
        callback=callback,
    )
    result.settings.update(class_id=k, l2_weight=l2_weight, tv_weight=tv_weight)
    if model.labels:
        result.settings["label"] = model.labels[k]
    return result


# -- shared by the synthesis functions -------------------------------------------------------
@torch.no_grad()
def evaluate(
    runner: nn.Module,
    model: Model,
    objective: Objective,
    pixels: torch.Tensor,
    *,
    validate: bool = False,
) -> float:
    """The objective at `pixels` without transforms. `validate`: run the whole network and
    check every layer, channel and class index first (clear errors before any work)."""
    x = model.preprocessing.normalize(pixels)
    try:
        found = probe(
            runner,
            objective,
            x.contiguous(memory_format=memory_format_of(runner)),
            x,
            stop_early=not validate,
        )
    except RuntimeError as e:
        if not validate or "size" not in str(e).lower():
            raise
        raise ModelError(
            f"the model fails on a {tuple(x.shape[-2:])} image ({str(e).splitlines()[0]}); "
            "try another size="
        ) from e
    if validate:
        objective.check(found)
    return float(objective(found))


def photo_pixels(
    model: Model, image: Any, size: tuple[int, int] | None, device: torch.device
) -> torch.Tensor:
    """A picture as pixels (1, 3, H, W) in [0, 1] on `device`: as the model sees it
    (resized and cropped by its preprocessing), then resized to `size` if given."""
    if isinstance(image, torch.Tensor):
        pixels = image.detach().float()
        pixels = pixels.unsqueeze(0) if pixels.ndim == 3 else pixels
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.min() < 0 or pixels.max() > 1:
            raise MethodError(
                "a tensor picture must be pixels (3, H, W) or (1, 3, H, W) in [0, 1]; "
                "for files and arrays pass them as they are"
            )
        pixels = pixels[:1]
    else:
        view = np.asarray(model.view(image), dtype=np.float32) / 255.0
        pixels = torch.from_numpy(view).permute(2, 0, 1).unsqueeze(0)
    if size is not None and tuple(pixels.shape[-2:]) != tuple(size):
        pixels = torch.nn.functional.interpolate(
            pixels, size=size, mode="bilinear", align_corners=False, antialias=True
        ).clamp(0, 1)
    return pixels.to(device)


def size_pair(size: int | tuple[int, int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    try:
        height, width = (int(s) for s in pair)
        ok = all(isinstance(s, int) and not isinstance(s, bool) for s in pair)
    except (TypeError, ValueError):
        ok = False
    if not ok or min(height, width) < 16:
        raise MethodError(f"size must be a whole number >= 16 or (height, width), got {size!r}")
    return height, width


def finite(value: torch.Tensor, step: int) -> float:
    number = float(value.detach())
    if not math.isfinite(number):
        raise MethodError(
            f"the objective became {number} at step {step + 1}; lower lr or the penalty weights"
        )
    return number
