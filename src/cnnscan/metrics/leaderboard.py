"""The per-image method leaderboard: which map of one class can be trusted.

The ranking rule (`rank_rows`): a map that fails a sanity check (its map hardly changes
when the classifier is randomized, or for another class) is marked and ranked below every
map that passes; within each group the maps are ordered by how well the model's confidence
follows them (insertion AUC − deletion AUC, higher is better), ties by name, so the same
scores always give the same order. Chance references are rows of the passing group: a
uniform-random map per pixel and, when layer maps are ranked, one at the coarsest layer
resolution upsampled the same way (pixel-wise deletion rewards scattered maps: see
docs/evaluation.md); each map is compared with the reference nearest its own resolution.
A completeness error above `COMPLETENESS_TOLERANCE` is a warning on the row. `advice`
turns the ranked rows into the one sentence a reader needs first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from cnnscan.attribution import Attribution
from cnnscan.errors import MetricError
from cnnscan.metrics.completeness import COMPLETENESS_TOLERANCE
from cnnscan.metrics.evaluation import evaluate_many
from cnnscan.metrics.registry import Column, get_metric, list_metrics
from cnnscan.metrics.relevance import random_attribution
from cnnscan.models import ModelLike

REFERENCE = "random"  # the name of the chance-level row
PASSES = "passes"


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
    references: dict[str, Attribution] = {}
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
    if references:
        sizes = {name: a.maps.shape[-2:] for name, a in {**chosen, **references}.items()}
        compare_with_chance(rows, {name: (int(h), int(w)) for name, (h, w) in sizes.items()})
    for row in rows:
        row["warnings"] = warnings(row)
    return rank_rows(rows)


def failures(row: Mapping[str, Any]) -> list[str]:
    """The verdicts of the row's sanity checks (metrics of the "sanity" family) other than
    "passes": e.g. ["fails model randomization"]; a constant map's "undefined" counts."""
    found = []
    for info in list_metrics("sanity"):
        check = row.get(info.name)
        if isinstance(check, Mapping) and check.get("verdict") not in (None, PASSES):
            found.append(str(check["verdict"]))
    return found


def checked(row: Mapping[str, Any]) -> bool:
    """True when a sanity check ran on the row's map."""
    return any(isinstance(row.get(info.name), Mapping) for info in list_metrics("sanity"))


def warnings(row: Mapping[str, Any]) -> list[str]:
    """What a reader must not miss about a row besides its sanity verdict: a completeness
    error above `COMPLETENESS_TOLERANCE`, a score at or below chance."""
    found = []
    error = row.get("completeness")
    if isinstance(error, float) and error > COMPLETENESS_TOLERANCE:
        found.append(
            f"completeness error {error:.2%} (above {COMPLETENESS_TOLERANCE:.0%}): the map does "
            "not add up to the score change it explains"
        )
    if row.get("above_chance") is False:
        found.append(f"no better than a random map ({row['chance']})")
    return found


def marks(row: Mapping[str, Any]) -> str:
    """What tables put after a row's name: ✗ a failed sanity check, ⚠ a warning."""
    return ("✗" if not row.get("trusted", True) else "") + ("⚠" if row.get("warnings") else "")


def compare_with_chance(rows: list[dict[str, Any]], sizes: Mapping[str, tuple[int, int]]) -> None:
    """Give each method row `chance` (the reference row nearest its map's resolution, by
    pixel count) and `above_chance` (its score beats that row's)."""
    references = {r["method"]: r for r in rows if r["reference"]}
    for row in rows:
        if row["reference"] or "score" not in row:
            continue
        area = math.log(sizes[row["method"]][0] * sizes[row["method"]][1])
        name = min(references, key=lambda n: abs(math.log(sizes[n][0] * sizes[n][1]) - area))
        row["chance"] = name
        row["above_chance"] = bool(row["score"] > references[name].get("score", -math.inf))


def rank_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows ordered by the ranking rule (module docstring), each given `rank` (maps with
    the same group and score share one) and `trusted` (False when a sanity check failed);
    any order of the same rows gives the same result."""
    for row in rows:
        row["trusted"] = not failures(row)

    def key(row: Mapping[str, Any]) -> tuple[bool, float, str]:
        score = row.get("score")
        missing = score is None or math.isnan(score)
        return (not row["trusted"], math.inf if missing else -score, row["method"])

    ordered = sorted(rows, key=key)
    for i, row in enumerate(ordered):
        before = ordered[i - 1] if i else None
        tied = before is not None and key(before)[:2] == key(row)[:2] and "score" in row
        row["rank"] = before["rank"] if tied else i + 1
    return ordered


@dataclass(frozen=True)
class BoardColumn:
    """A leaderboard column as tables show it: the metric's column (key, title with ↑ or ↓,
    how a value reads), what it measures and which way is better."""

    column: Column
    description: str
    higher_is_better: bool | None

    @property
    def better(self) -> str:
        if self.higher_is_better is None:
            return "a check: passes, or fails when the map hardly changes"
        return "higher is better" if self.higher_is_better else "lower is better"


SCORE = BoardColumn(
    Column("score", "ins−del↑"),
    "Insertion AUC − deletion AUC, the ranking score: how much faster the class probability "
    "rises when the map's most relevant pixels are added than it falls when they are removed.",
    True,
)


def board_columns(rows: Sequence[Mapping[str, Any]] = ()) -> list[BoardColumn]:
    """Every registered metric's columns (the score right after insertion), read from the
    metric registry; with `rows`, only the columns some row has."""
    out = []
    for info in list_metrics():
        for column in info.columns:
            out.append(BoardColumn(column, info.description, info.higher_is_better))
        if info.name == "insertion_auc":
            out.append(SCORE)
    if rows:
        out = [c for c in out if any(c.column.key in row for row in rows)]
    return out


def advice(rows: Sequence[Mapping[str, Any]]) -> str:
    """One sentence naming the map to look at and why, from ranked rows ("" when the rows
    have no score to rank by)."""
    methods = [r for r in rows if not r["reference"] and r.get("score") is not None]
    if not methods:
        return ""
    sanity = any(checked(r) for r in methods)
    good = [r for r in methods if r.get("trusted", True) and not r.get("warnings")]
    if not good:
        checks = "the sanity check, a random map's score" if sanity else "a random map's score"
        return (
            f"No map here passes every check ({checks}, the completeness tolerance): read "
            "them with care; the table says which check each one misses."
        )
    best = good[0]
    same = [r["method"] for r in good[1:] if r["score"] == best["score"]]
    name = best["method"] + (f" (the same score as {', '.join(same)})" if same else "")
    chance = next((r for r in rows if r["method"] == best.get("chance")), None)
    against = (
        f"; chance at its resolution, {chance['method']}: {chance['score']:.3f}" if chance else ""
    )
    numbers = f"insertion − deletion AUC {best['score']:.3f}{against}"
    if sanity:
        return (
            f"Look at {name}: it passes the sanity check, and the model's confidence follows "
            f"it best of the maps that do ({numbers})."
        )
    return (
        f"Look at {name}: the model's confidence follows it best ({numbers}); the sanity "
        "check did not run, so nothing here shows that the map depends on the model."
    )
