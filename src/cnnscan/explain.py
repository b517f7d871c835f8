"""`explain` / `explain_many` / `predict`: the library's front door onto `Scan` and methods."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cnnscan.attribution import Attribution
from cnnscan.display import Predictions
from cnnscan.errors import MethodError
from cnnscan.methods import MethodInfo, check_options, get_method
from cnnscan.models import Model, load_model
from cnnscan.scan import Scan
from cnnscan.targets import Targets

ModelLike = Model | nn.Module | str | None


def as_inputs(model: Model, image: Any, device: torch.device | None = None) -> torch.Tensor:
    """A (N, 3, H, W) input tensor from a preprocessed tensor, an image, or a list of images."""
    device = device or model.device
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        return (image.unsqueeze(0) if image.ndim == 3 else image).to(device)
    if isinstance(image, list | tuple):
        return torch.cat([as_inputs(model, item, device) for item in image])
    return model.preprocess(image).to(device)


def make_scan(
    model: ModelLike,
    image: Any,
    methods: Sequence[MethodInfo] = (),
    *,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    max_memory: int | float | str | None = None,
) -> Scan:
    """One shared forward for `methods` (switchable ReLUs only if one of them needs them)."""
    model = model if isinstance(model, Model) else load_model(model)
    device = torch.device(device) if device is not None else model.device
    return Scan(
        model,
        as_inputs(model, image, device),
        relu_rules=any(m.relu_rules for m in methods),
        device=device,
        batch_size=batch_size,
        max_memory=max_memory,
    )


def run_method(
    scan: Scan,
    info: MethodInfo,
    targets: Targets,
    layer: str | list[str] | None = None,
    options: dict[str, Any] | None = None,
) -> Attribution:
    """Run one registered method on a scan and wrap its result."""
    options = dict(options or {})
    if layer is not None:
        if "layer" not in info.options():
            raise MethodError(f"{info.name} works in input space and takes no layer")
        options["layer"] = layer
    check_options(info, options)
    if info.relu_rules and not scan.relu_rules:
        scan = scan.derive(scan.inputs, relu_rules=True)
    target_ids = scan.targets(targets)
    result = info.fn(scan, target_ids, **options)
    scores = scan.scores(target_ids) if result.targets is None else result.scores
    return Attribution(
        maps=result.maps,
        targets=target_ids if result.targets is None else result.targets,
        method=info.name,
        inputs=scan.inputs,
        layer=result.layer,
        scores=scores,
        labels=scan.model.labels,
        extras=result.extras,
        preprocessing=scan.model.preprocessing,
    )


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
    """
    infos = [get_method(name) for name in methods]
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
    scan = make_scan(model, image)
    return Predictions(top_predictions(scan, k))


def top_predictions(scan: Scan, k: int = 5) -> list[list[dict[str, Any]]]:
    """The top-k table of an existing scan."""
    probabilities, ids = scan.top(k)
    labels = scan.model.labels
    return [
        [
            {
                "rank": rank + 1,
                "class_id": int(class_id),
                "label": labels[int(class_id)],
                "probability": float(probability),
                "logit": float(scan.logits.detach()[i, int(class_id)]),
            }
            for rank, (probability, class_id) in enumerate(zip(row_p, row_ids, strict=True))
        ]
        for i, (row_p, row_ids) in enumerate(zip(probabilities, ids, strict=True))
    ]
