"""`evaluate` / `evaluate_many`: score attributions with any registered metrics (see
`cnnscan.metrics.registry`), sharing forwards: every map of every attribution is perturbed
in one batched pass per metric. Results are dicts of plain values: a float for an
attribution with one image and one target, else nested lists (images × targets).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from typing import Any

import torch
from PIL import Image

from cnnscan.attribution import Attribution
from cnnscan.engine.threads import beside
from cnnscan.errors import MethodError, MetricError
from cnnscan.images import load_image
from cnnscan.methods import get_method
from cnnscan.metrics import localization
from cnnscan.metrics.registry import MetricContext, MetricInfo, choose_metrics, plain
from cnnscan.metrics.relevance import REDUCTIONS, relevance
from cnnscan.metrics.sanity import THRESHOLD
from cnnscan.models import Model, ModelLike, as_model
from cnnscan.scan import Scan, make_scan


def _picture(image: Any) -> Image.Image | None:
    """The user's picture (for box/mask coordinates); None for a preprocessed tensor."""
    if image is None or (isinstance(image, torch.Tensor) and image.is_floating_point()):
        return None
    return load_image(image)


def evaluate(
    model: ModelLike,
    image: Any,
    attr: Attribution,
    metrics: Sequence[str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Scores of one attribution: {metric: value, ..., "curves": {...}} (see `evaluate_many`)."""
    return evaluate_many(model, image, {attr.method: attr}, metrics, **options)[attr.method]


def evaluate_many(
    model: ModelLike,
    image: Any,
    attrs: Mapping[str, Attribution] | Sequence[Attribution],
    metrics: Sequence[str] | None = None,
    *,
    steps: int = 50,
    substrate: str | torch.Tensor | None = None,
    reduce: str = "abs",
    box: Sequence[float] | str | None = None,
    mask: Any = None,
    tolerance: int = 15,
    cascade: bool = False,
    threshold: float = THRESHOLD,
    n_samples: int = 10,
    noise_level: float = 0.02,
    method_options: Mapping[str, dict[str, Any]] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    scan: Scan | None = None,
    progress: Any = None,
    timings: dict[str, float] | None = None,
    regions: Sequence[torch.Tensor | None] | None = None,
    lane: Executor | None = None,
) -> dict[str, dict[str, Any]]:
    """Scores of several attributions of the same image(s): {name: {metric: value}}.

    `image` is the picture the attributions explain (boxes and masks are in its pixel
    coordinates) or None / the model-input tensor (then they are in input coordinates).
    `metrics`: names from `list_metrics()` (default: every metric marked default, and the
    localization metrics when a region is given). Options: `steps` of deletion/insertion;
    `substrate` for both (default RISE's: zeros for deletion, a blur for insertion);
    `reduce` ("abs", "signed", "positive") the channel reduction; `box` / `mask` the object
    region and `tolerance` the pointing game's slack in pixels; `cascade=True` randomizes
    every block, not only the top one; `threshold` the Spearman ρ from which a sanity check
    fails; `n_samples` and `noise_level` of max-sensitivity; `method_options` {name:
    options} for the methods' re-runs (sanity checks, max-sensitivity); `seed` for every
    random choice; `scan` a scan of the same inputs to reuse (saves a forward);
    `progress(n)` after each chunk of perturbed forwards; `timings`, a dict that gets the
    seconds spent per metric added; `regions` one region (H, W) on the model input per
    image, or None for an image without one (its localization scores are NaN), instead of
    `box`/`mask`; `lane` an executor (`cnnscan.engine.threads`) that runs the metrics made
    of forwards only (deletion, insertion) while the others run here.
    """
    timings = {} if timings is None else timings
    if not isinstance(attrs, Mapping):
        attrs = {attr.method: attr for attr in attrs}
    if not attrs:
        raise MetricError("no attributions to evaluate")
    if reduce not in REDUCTIONS:
        raise MetricError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    chosen = choose_metrics(metrics, box is not None or mask is not None or regions is not None)
    model = as_model(model)
    first = next(iter(attrs.values()))
    inputs = first.inputs
    for name, attr in attrs.items():
        if attr.inputs.shape != inputs.shape or not torch.equal(attr.inputs, inputs):
            raise MetricError(
                f"{name} explains other inputs than {first.method}; evaluate them apart"
            )
    picture = _picture(image)
    if picture is not None:
        expected = model.preprocessing(picture, device=inputs.device)
        if expected.shape[1:] != inputs.shape[1:] or not torch.allclose(
            expected.to(inputs.dtype), inputs[:1], atol=1e-4
        ):
            raise MetricError(
                "the attribution explains a different image than the one given; pass the "
                "image it was computed for (or image=None)"
            )
    rerun = [m.name for m in chosen if m.reruns_method]
    infos = []
    for name, attr in attrs.items() if rerun else ():
        try:
            infos.append(get_method(attr.method))
        except MethodError as e:
            raise MetricError(
                f"{name}: {', '.join(rerun)} re-run the method, but {attr.method!r} is "
                "not a registered method; leave those metrics out"
            ) from e
    reusable = (
        scan is not None
        and scan.model.module is model.module
        and scan.inputs.shape == inputs.shape
        and torch.equal(scan.inputs, inputs)
    )
    if not reusable:
        scan = make_scan(model, inputs, infos, device=device)
    rel = {name: relevance(attr, reduce) for name, attr in attrs.items()}
    if regions is None:
        regions = _region_per_image(model, inputs, box, mask, picture, chosen)
    ctx = MetricContext(
        model=model,
        scan=scan,
        attrs=attrs,
        rel=rel,
        regions=None if regions is None else list(regions),
        steps=steps,
        substrate=substrate,
        reduce=reduce,
        tolerance=tolerance,
        cascade=cascade,
        threshold=threshold,
        n_samples=n_samples,
        noise_level=noise_level,
        method_options=dict(method_options or {}),
        seed=seed,
        progress=progress,
    )
    found: dict[str, dict[str, dict[str, Any]]] = {}

    def run(group: Sequence[MetricInfo], clock: _Clock) -> None:
        for info in group:
            clock.start(info.name)
            found[info.name] = info.fn(ctx)
        clock.start(None)

    apart = [info for info in chosen if info.forwards_only] if lane is not None else []
    with beside(lane if apart else None, run, apart, _Clock(timings)):  # distinct keys
        run([info for info in chosen if info not in apart], _Clock(timings))
    results: dict[str, dict[str, Any]] = {name: {} for name in attrs}
    for info in chosen:  # merged in the metrics' order, whichever finished first
        for name, values in found[info.name].items():
            _merge(results[name], values)
    return results


def _region_per_image(
    model: Model,
    inputs: torch.Tensor,
    box: Sequence[float] | str | None,
    mask: Any,
    picture: Image.Image | None,
    chosen: Sequence[MetricInfo],
) -> list[torch.Tensor | None] | None:
    """The object region on the model input, the same for every image, if a metric needs it."""
    if not any(info.needs_region for info in chosen):
        return None
    area = localization.region(
        tuple(inputs.shape[-2:]),
        box=box,
        mask=mask,
        picture=picture,
        preprocessing=model.preprocessing,
    ).to(inputs.device)
    return [area] * len(inputs)


def _merge(into: dict[str, Any], values: Mapping[str, Any]) -> None:
    """Add a metric's values: (N, T...) tensors as plain numbers/lists, dicts merged (curves)."""
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            value = plain(value.cpu())
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        elif isinstance(value, Mapping):
            into[key] = {}
            _merge(into[key], value)
        else:
            into[key] = value


class _Clock:
    """Adds the seconds between `start(label)` calls to `timings[label]`."""

    def __init__(self, timings: dict[str, float]):
        self.timings, self.label, self.began = timings, None, 0.0

    def start(self, label: str | None) -> None:
        now = time.perf_counter()
        if self.label is not None:
            self.timings[self.label] = self.timings.get(self.label, 0.0) + now - self.began
        self.label, self.began = label, now
