"""Evaluation: which explanation can a user trust? `evaluate` scores one Attribution,
`evaluate_many` several (sharing forwards), with any registered method's maps.

Every metric reads maps through one reduction (`relevance`, see metrics/relevance.py) and
returns one number per (image, target) of the attribution. Results are dicts of plain
values: a float for an attribution with one image and one target, else nested lists
(images × targets).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from cnnscan.attribution import Attribution
from cnnscan.errors import MethodError, MetricError
from cnnscan.explain import ModelLike, make_scan
from cnnscan.images import load_image
from cnnscan.methods import get_method
from cnnscan.metrics import faithfulness, localization, robustness, sanity
from cnnscan.metrics.relevance import REDUCTIONS, random_attribution, relevance
from cnnscan.models import Model, load_model
from cnnscan.scan import Scan

METRICS = (
    "deletion_auc",
    "insertion_auc",
    "average_drop",
    "pointing_game",
    "energy_in_box",
    "model_randomization",
    "target_randomization",
    "max_sensitivity",
    "completeness",
)
# Evaluated when `metrics` is not given: everything except max-sensitivity (it re-runs the
# method n_samples times); the localization metrics when a box or mask is given.
DEFAULT_METRICS = (
    "deletion_auc",
    "insertion_auc",
    "average_drop",
    "model_randomization",
    "target_randomization",
    "completeness",
)
_NEEDS_REGION = ("pointing_game", "energy_in_box")
_RERUN = ("model_randomization", "target_randomization", "max_sensitivity")
# Where methods report how well their maps add up to the explained score change: these
# extras first, then any other `*_error_relative` extra of shape (N, T).
COMPLETENESS_KEYS = ("completeness_error_relative", "conservation_error_relative")

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "REDUCTIONS",
    "evaluate",
    "evaluate_many",
    "random_attribution",
    "relevance",
]


def _plain(values: torch.Tensor | list) -> Any:
    """(N, T) values -> a float for one pair, else nested lists (NaN kept as float nan)."""
    listed = values.tolist() if isinstance(values, torch.Tensor) else values
    if len(listed) == 1 and len(listed[0]) == 1:
        return listed[0][0]
    return listed


def _choose(metrics: Sequence[str] | str | None, has_region: bool) -> list[str]:
    if metrics is None:
        return [*DEFAULT_METRICS, *(_NEEDS_REGION if has_region else ())]
    chosen = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in chosen if m not in METRICS]
    if unknown:
        raise MetricError(f"unknown metric(s) {unknown}; metrics: {', '.join(METRICS)}")
    missing = [m for m in chosen if m in _NEEDS_REGION]
    if missing and not has_region:
        raise MetricError(f"{', '.join(missing)} need a region: pass box=(x0, y0, x1, y1) or mask=")
    return list(dict.fromkeys(chosen))


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
    threshold: float = sanity.THRESHOLD,
    n_samples: int = 10,
    noise_level: float = 0.02,
    method_options: Mapping[str, dict[str, Any]] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    scan: Scan | None = None,
    progress: Any = None,
    timings: dict[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """Scores of several attributions of the same image(s): {name: {metric: value}}.

    `image` is the picture the attributions explain (boxes and masks are in its pixel
    coordinates) or None / the model-input tensor (then they are in input coordinates).
    Options: `steps` of deletion/insertion; `substrate` for both (default RISE's: zeros for
    deletion, a blur for insertion); `reduce` ("abs", "signed", "positive") the channel
    reduction; `box` / `mask` the object region and `tolerance` the pointing game's slack in
    pixels; `cascade=True` randomizes every block, not only the top one; `threshold` the
    Spearman ρ from which a sanity check fails; `n_samples` and
    `noise_level` of max-sensitivity; `method_options` {name: options} for the methods'
    re-runs (sanity checks, max-sensitivity); `seed` for every random choice; `scan` a
    scan of the same inputs to reuse (saves a forward); `progress(n)` after each chunk of
    perturbed forwards; `timings`, a dict that gets the seconds spent per metric added.
    """
    timings = {} if timings is None else timings
    if not isinstance(attrs, Mapping):
        attrs = {attr.method: attr for attr in attrs}
    if not attrs:
        raise MetricError("no attributions to evaluate")
    if reduce not in REDUCTIONS:
        raise MetricError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    chosen = _choose(metrics, box is not None or mask is not None)
    model = model if isinstance(model, Model) else load_model(model)
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
    rerun = [m for m in chosen if m in _RERUN]
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
    results: dict[str, dict[str, Any]] = {name: {} for name in attrs}

    # One batched pass for every map's curves / masked inputs.
    names = list(attrs)
    stacked = torch.cat([rel[name].flatten(0, 1) for name in names])
    image_ids = torch.cat(
        [
            torch.arange(attrs[n].targets.shape[0]).repeat_interleave(attrs[n].targets.shape[1])
            for n in names
        ]
    ).to(inputs.device)
    target_ids = torch.cat([attrs[n].targets.flatten() for n in names]).to(inputs.device)
    sizes = [rel[name].shape[:2] for name in names]

    def split(values: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = values.split([int(s[0] * s[1]) for s in sizes])
        return {n: p.reshape(*s, *p.shape[1:]) for n, p, s in zip(names, parts, sizes, strict=True)}

    kinds = tuple(k for k in ("deletion", "insertion") if f"{k}_auc" in chosen)
    clock = _Clock(timings)
    if kinds:
        clock.start("+".join(kinds))
        substrates = None if substrate is None else dict.fromkeys(kinds, substrate)
        curves = faithfulness.causal_curves(
            scan,
            stacked,
            image_ids,
            target_ids,
            kinds=kinds,
            steps=steps,
            substrates=substrates,
            seed=seed,
            progress=progress,
        )
        shown = {name: {"fraction": curves.fractions.tolist()} for name in names}
        for kind in kinds:
            aucs, probabilities = split(curves.auc(kind)), split(curves.probabilities[kind])
            for name in names:
                results[name][f"{kind}_auc"] = _plain(aucs[name])
                shown[name][kind] = _plain_curves(probabilities[name])
        for name in names:
            results[name]["curves"] = shown[name]
    if "average_drop" in chosen:
        clock.start("average_drop")
        drop, increase = faithfulness.confidence_change(scan, stacked, image_ids, target_ids)
        drops, increases = split(drop), split(increase)
        for name in names:
            results[name]["average_drop"] = _plain(drops[name])
            results[name]["increase_in_confidence"] = _plain(increases[name])
    if any(m in chosen for m in _NEEDS_REGION):
        clock.start("localization")
        area = localization.region(
            tuple(inputs.shape[-2:]),
            box=box,
            mask=mask,
            picture=picture,
            preprocessing=model.preprocessing,
        ).to(stacked.device)
        regions = area.expand_as(stacked)
        if "pointing_game" in chosen:
            hits = split(localization.pointing_game(stacked, regions, tolerance))
            for name in names:
                results[name]["pointing_game"] = _plain(hits[name])
        if "energy_in_box" in chosen:
            energy = split(localization.energy_in_box(stacked, regions))
            for name in names:
                results[name]["energy_in_box"] = _plain(energy[name])
    options = dict(method_options or {})
    if "model_randomization" in chosen:
        clock.start("model_randomization")
        blocks, sims = sanity.model_randomization(
            model, scan, attrs, rel, cascade=cascade, options=options, reduce=reduce, seed=seed
        )
        for name in names:
            results[name]["model_randomization"] = {
                "blocks": blocks,
                "spearman": [_plain(s.spearman) for s in sims[name]],
                "ssim": [_plain(s.ssim) for s in sims[name]],
                "verdict": _plain(
                    sanity.verdict(sims[name][0].spearman, "fails model randomization", threshold)
                ),
            }
    if "target_randomization" in chosen:
        clock.start("target_randomization")
        targets, sims = sanity.target_randomization(
            scan, attrs, rel, options=options, reduce=reduce, seed=seed
        )
        for name in names:
            results[name]["target_randomization"] = {
                "targets": _plain(targets[name].cpu()),
                "spearman": _plain(sims[name].spearman),
                "ssim": _plain(sims[name].ssim),
                "verdict": _plain(
                    sanity.verdict(sims[name].spearman, "fails target randomization", threshold)
                ),
            }
    if "max_sensitivity" in chosen:
        clock.start("max_sensitivity")
        worst = robustness.max_sensitivity(
            scan,
            attrs,
            rel,
            n_samples=n_samples,
            noise_level=noise_level,
            options=options,
            reduce=reduce,
            seed=seed,
        )
        for name in names:
            results[name]["max_sensitivity"] = _plain(worst[name])
    if "completeness" in chosen:
        for name in names:
            results[name]["completeness"] = _completeness(attrs[name])
    clock.start(None)
    return results


class _Clock:
    """Adds the seconds between `start(label)` calls to `timings[label]`."""

    def __init__(self, timings: dict[str, float]):
        self.timings, self.label, self.began = timings, None, 0.0

    def start(self, label: str | None) -> None:
        now = time.perf_counter()
        if self.label is not None:
            self.timings[self.label] = self.timings.get(self.label, 0.0) + now - self.began
        self.label, self.began = label, now


def _plain_curves(curves: torch.Tensor) -> Any:
    """(N, T, K) curves -> one list for one pair, else nested lists."""
    listed = curves.tolist()
    return listed[0][0] if len(listed) == 1 and len(listed[0]) == 1 else listed


def _completeness(attr: Attribution) -> Any:
    """The relative completeness / conservation error the method reported, or None when it
    reports none (the method makes no such promise)."""
    others = [key for key in attr.extras if key.endswith("_error_relative")]
    for key in dict.fromkeys([*COMPLETENESS_KEYS, *others]):
        value = attr.extras.get(key)
        if isinstance(value, torch.Tensor) and value.shape == attr.targets.shape:
            return _plain(value.double().cpu())
    return None
