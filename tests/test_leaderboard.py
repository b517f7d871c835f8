"""The leaderboard's ranking rule: a map that fails a sanity check is never ranked above one
that passes; chance rows are present; the same rows (or the same seed) always give the
same ranking; the sentence on top names a map that passes every check; every column says
what it measures and which way is better."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from helpers import SmallConvNet

import cnnscan
from cnnscan.metrics.completeness import COMPLETENESS_TOLERANCE
from cnnscan.metrics.leaderboard import (
    advice,
    board_columns,
    leaderboard,
    rank_rows,
    warnings,
)
from cnnscan.metrics.registry import get_metric

FAILS = "fails model randomization"


def row(method: str, score: float, verdict: str | None = "passes", **extra) -> dict:
    """A hand-built leaderboard row (as `leaderboard` makes them)."""
    made = {"method": method, "reference": method.startswith("random"), "score": score, **extra}
    if verdict is not None:
        made["model_randomization"] = {"verdict": verdict, "spearman": [0.5], "ssim": [0.5]}
    made["warnings"] = warnings(made)
    return made


def random_rows(seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = [
        row(f"m{i}", rng.choice([rng.uniform(-0.2, 0.6), 0.25]), rng.choice(["passes", FAILS]))
        for i in range(12)
    ]
    return [*rows, row("random", rng.uniform(-0.1, 0.2), None)]


@pytest.mark.parametrize("seed", range(20))
def test_a_failing_map_is_never_ranked_above_a_passing_one(seed):
    ranked = rank_rows(random_rows(seed))
    trusted = [r["trusted"] for r in ranked]
    assert trusted == sorted(trusted, reverse=True)  # every passing row before every failing one
    for group in (True, False):
        scores = [r["score"] for r in ranked if r["trusted"] == group]
        assert scores == sorted(scores, reverse=True)
    assert next(r for r in ranked if r["method"] == "random")["trusted"]  # chance: no check
    for before, after in itertools.pairwise(ranked):
        assert before["rank"] <= after["rank"]
        tied = before["trusted"] == after["trusted"] and before["score"] == after["score"]
        assert (before["rank"] == after["rank"]) == tied


def test_an_undefined_verdict_counts_as_failing():
    ranked = rank_rows([row("constant", 0.9, "undefined (constant map)"), row("plain", 0.1)])
    assert [r["method"] for r in ranked] == ["plain", "constant"]
    assert not ranked[1]["trusted"]


@pytest.mark.parametrize("seed", range(5))
def test_the_same_rows_in_any_order_give_the_same_ranking(seed):
    rows = random_rows(seed)
    expected = [(r["method"], r["rank"]) for r in rank_rows([dict(r) for r in rows])]
    shuffled = [dict(r) for r in rows]
    random.Random(seed + 100).shuffle(shuffled)
    assert [(r["method"], r["rank"]) for r in rank_rows(shuffled)] == expected


@pytest.fixture(scope="module")
def small():
    """A small network and two maps of its top class."""
    model = cnnscan.load_model(SmallConvNet(classes=4))
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    scan = cnnscan.Scan(model, x)
    attrs = {
        name: cnnscan.explain(model, None, name, targets="top1", scan=scan)
        for name in ("gradient", "gradcam", "smoothgrad")
    }
    return model, scan, attrs


def test_the_random_baseline_rows_are_on_the_board(small):
    model, scan, attrs = small
    metrics = ["deletion_auc", "insertion_auc", "model_randomization"]
    rows = leaderboard(model, None, attrs, metrics, scan=scan, steps=4)
    references = {r["method"]: r for r in rows if r["reference"]}
    assert "random" in references and all(r["trusted"] for r in references.values())
    coarse = tuple(attrs["gradcam"].maps.shape[-2:])
    assert f"random {coarse[0]}×{coarse[1]}" in references
    by_name = {r["method"]: r for r in rows}
    assert by_name["gradient"]["chance"] == "random"  # compared at its own resolution
    assert by_name["gradcam"]["chance"] == f"random {coarse[0]}×{coarse[1]}"
    for name in attrs:
        chance = references[by_name[name]["chance"]]
        assert by_name[name]["above_chance"] == (by_name[name]["score"] > chance["score"])


def test_two_runs_with_the_same_seed_give_the_same_ranking(small):
    model, scan, attrs = small
    metrics = ["deletion_auc", "insertion_auc", "model_randomization"]
    runs = [leaderboard(model, None, attrs, metrics, scan=scan, steps=4, seed=3) for _ in range(2)]
    assert [(r["method"], r["rank"]) for r in runs[0]] == [
        (r["method"], r["rank"]) for r in runs[1]
    ]
    assert [r["score"] for r in runs[0]] == [r["score"] for r in runs[1]]


def test_advice_names_the_best_map_that_passes_every_check():
    rows = rank_rows(
        [
            row("lrp", 0.45, FAILS),
            row("integrated_gradients", 0.30, completeness=0.2),
            row("gradcam", 0.26, chance="random", above_chance=True),
            row("xgradcam", 0.26, chance="random", above_chance=True),
            row("gradient", 0.05, chance="random", above_chance=False),
            row("random", 0.07, None),
        ]
    )
    assert [r["method"] for r in rows][:2] == ["integrated_gradients", "gradcam"]
    sentence = advice(rows)
    assert sentence.startswith("Look at gradcam (the same score as xgradcam): it passes")
    assert "0.260" in sentence and "chance at its resolution, random: 0.070" in sentence
    assert "lrp" not in sentence and "integrated_gradients" not in sentence


def test_advice_says_when_no_map_passes_every_check():
    rows = rank_rows([row("lrp", 0.45, FAILS), row("random", 0.07, None)])
    assert advice(rows).startswith("No map here passes every check")
    unchecked = rank_rows([row("gradcam", 0.3, None), row("random", 0.1, None)])
    assert "the sanity check did not run" in advice(unchecked)
    assert advice(rank_rows([{"method": "gradcam", "reference": False, "warnings": []}])) == ""


def test_a_completeness_error_above_the_tolerance_is_a_warning():
    assert warnings({"completeness": COMPLETENESS_TOLERANCE}) == []
    (warning,) = warnings({"completeness": 0.9996})
    assert warning.startswith("completeness error 99.96% (above 5%)")
    (below,) = warnings({"above_chance": False, "chance": "random"})
    assert "random" in below


def test_every_column_says_what_it_measures_and_which_way_is_better():
    for column in board_columns():
        assert column.description
        if column.higher_is_better is None:
            assert "check" in column.better
            continue
        assert column.column.title[-1] in "↑↓", column.column.title
        assert column.better == (
            "higher is better" if column.higher_is_better else "lower is better"
        )
    titles = {c.column.key: c.column.title for c in board_columns()}
    assert titles["deletion_auc"].endswith("↓") and titles["insertion_auc"].endswith("↑")
    assert titles["score"].endswith("↑") and titles["completeness"].endswith("↓")
    assert get_metric("completeness").higher_is_better is False
