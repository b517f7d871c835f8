"""`explain` / `explain_many` / `predict`: the library's front door onto `Scan` and methods."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cnnscan.attribution import Attribution
from cnnscan.display import Predictions
from cnnscan.errors import MethodError
from cnnscan.methods import get_method, get_methods, run_method
from cnnscan.models import ModelLike
from cnnscan.scan import Scan, make_scan
from cnnscan.targets import Targets


def explain(
    model: ModelLike,
    image: Any,
    method: str = "gradient",
    targets: Targets = "top1",
    *,
    layer: str | list[str] | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    max_memory: int | float | str | None = None,
    scan: Scan | None = None,
    **options: Any,
) -> Attribution:
    """Explain the model's prediction on `image` with `method` for `targets`.

    `image`: a path, PIL image, HxWx3 array, or a preprocessed float tensor (N, 3, H, W).
    `targets`: "top5", an int, class ids, class names, or a LongTensor (N, T).
    Options are the method's own (see `cnnscan.list_methods()` / `MethodInfo.options()`).
    `batch_size` fixes the batch of extra passes (default: measured); `max_memory` caps a
    batch's working memory (MiB or "4GB"; default `CNNSCAN_MEMORY_MB` or 2048 MiB).
    Pass `scan=` to reuse a forward pass already made for this image.
    """
    info = get_method(method)
    if scan is None:
        scan = make_scan(
            model, image, [info], device=device, batch_size=batch_size, max_memory=max_memory
        )
    return run_method(scan, info, targets, layer, options)


def explain_many(
    model: ModelLike,
    image: Any,
    methods: Sequence[str],
    targets: Targets = "top1",
    *,
    layer: str | list[str] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    max_memory: int | float | str | None = None,
) -> dict[str, Attribution]:
    """Several methods from one shared forward pass: method name -> Attribution.

    `options` maps a method name to its options; `layer` goes to the methods that use one.
    A method named twice is an error (see `cnnscan.methods.get_methods`).
    """
    infos = get_methods(methods)
    options = options or {}
    unknown = set(options) - {info.name for info in infos}
    if unknown:
        raise MethodError(f"options given for methods not requested: {', '.join(sorted(unknown))}")
    scan = make_scan(
        model, image, infos, device=device, batch_size=batch_size, max_memory=max_memory
    )
    return {
        info.name: run_method(
            scan,
            info,
            targets,
            layer if "layer" in info.options() else None,
            options.get(info.name),
        )
        for info in infos
    }


def predict(model: ModelLike, image: Any, k: int = 5) -> Predictions:
    """Top-k predictions per image: [{rank, class_id, label, probability, logit}, ...]
    (a list that shows itself as a table in Jupyter)."""
    return Predictions(make_scan(model, image).predictions(k))
