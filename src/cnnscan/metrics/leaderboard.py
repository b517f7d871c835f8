"""The per-image method leaderboard: every method's map for one class, ranked by how well
the model's confidence follows it (insertion AUC − deletion AUC, higher is better), beside a
uniform-random map as the chance reference and each method's sanity-check verdict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cnnscan.attribution import Attribution
from cnnscan.errors import MetricError
from cnnscan.explain import ModelLike
from cnnscan.metrics import _RERUN, evaluate_many
from cnnscan.metrics.relevance import random_attribution

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
    return Attribution(
        maps=attr.maps[:, target : target + 1],
        targets=attr.targets[:, target : target + 1],
        method=attr.method,
        inputs=attr.inputs,
        layer=attr.layer,
        scores=None if attr.scores is None else attr.scores[:, target : target + 1],
        labels=attr.labels,
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
    random-map row (reference=True) is ranked among them."""
    for name, attr in attrs.items():
        if attr.targets.shape[0] != 1:
            raise MetricError(
                f"the leaderboard ranks maps of one image; {name} has {attr.targets.shape[0]}"
            )
    chosen = {name: select_target(attr, target) for name, attr in attrs.items()}
    scores = evaluate_many(model, image, chosen, metrics, **options) if chosen else {}
    if chosen:
        cheap = [m for m in metrics if m not in _RERUN and m != "completeness"]
        baseline = random_attribution(next(iter(chosen.values())), options.get("seed", 0))
        if cheap:
            scores[REFERENCE] = evaluate_many(
                model, image, {REFERENCE: baseline}, cheap, **options
            )[REFERENCE]
    rows = []
    for name, values in scores.items():
        row = {"method": name, "reference": name == REFERENCE, **values}
        if "deletion_auc" in values and "insertion_auc" in values:
            row["score"] = values["insertion_auc"] - values["deletion_auc"]
        rows.append(row)
    rows.sort(key=lambda r: (-r.get("score", float("-inf")), r.get("deletion_auc", 0.0)))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows
