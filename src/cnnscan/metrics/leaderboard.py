"""The per-image method leaderboard: every method's map for one class, ranked by how well
the model's confidence follows it (insertion AUC − deletion AUC, higher is better), beside
each method's sanity-check verdict and chance references: a uniform-random map per pixel
and, when layer maps are ranked, one at the coarsest layer resolution upsampled the same
way (pixel-wise deletion rewards scattered maps: see docs/evaluation.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from cnnscan.attribution import Attribution
from cnnscan.errors import MetricError
from cnnscan.metrics.evaluation import evaluate_many
from cnnscan.metrics.registry import get_metric
from cnnscan.metrics.relevance import random_attribution
from cnnscan.models import ModelLike

REFERENCE = "random"  # the name of the chance-level row


def select_target(attr: Attribution, target: int = 0) -> Attribution:
    """The attribution of one target column, with per-(image, target) extras sliced too."""
    n, t = attr.targets.shape
    extras = {
        key: value[:, target : target + 1]
        if isinstance(value, torch.Tensor) and value.ndim >= 2 and tuple(value.shape[:2]) == (n, t)
        else value
        for key, value in attr.extras.items()
    }
    return replace(
        attr,
        maps=attr.maps[:, target : target + 1],
        targets=attr.targets[:, target : target + 1],
        scores=None if attr.scores is None else attr.scores[:, target : target + 1],
        extras=extras,
    )


def leaderboard(
    model: ModelLike,
    image: Any,
    attrs: Mapping[str, Attribution],
    metrics: Sequence[str] = (
        "deletion_auc",
        "insertion_auc",
        "model_randomization",
        "completeness",
    ),
    *,
    target: int = 0,
    **options: Any,
) -> list[dict[str, Any]]:
    """Rows {method, rank, deletion_auc, insertion_auc, score, <other metrics>, curves,
    reference} best first, for target column `target` of one-image attributions; the
    random-map rows (reference=True) are ranked among them."""
    for name, attr in attrs.items():
        if attr.targets.shape[0] != 1:
            raise MetricError(
                f"the leaderboard ranks maps of one image; {name} has {attr.targets.shape[0]}"
            )
    chosen = {name: select_target(attr, target) for name, attr in attrs.items()}
    scores = evaluate_many(model, image, chosen, metrics, **options) if chosen else {}
    cheap = [m for m in metrics if get_metric(m).reference]
    if chosen and cheap:
        first = next(iter(chosen.values()))
        seed = options.get("seed", 0)
        references = {REFERENCE: random_attribution(first, seed)}
        coarse = min((a.maps.shape[-2:] for a in chosen.values()), key=lambda s: s[0] * s[1])
        if tuple(coarse) != tuple(first.input_size):
            reference = random_attribution(first, seed, tuple(coarse))
            references[reference.method] = reference
        scores.update(evaluate_many(model, image, references, cheap, **options))
    rows = []
    for name, values in scores.items():
        row = {"method": name, "reference": name.startswith(REFERENCE), **values}
        if "deletion_auc" in values and "insertion_auc" in values:
            row["score"] = values["insertion_auc"] - values["deletion_auc"]
        rows.append(row)
    rows.sort(key=lambda r: (-r.get("score", float("-inf")), r.get("deletion_auc", 0.0)))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows
