"""The "Which method should I trust?" page, computed when the site is built: the scan's
leaderboard (`cnnscan.metrics.leaderboard`) of every method's map of the gallery photos,
ranked by its rule (maps that fail the model-randomization sanity check last, each group by
insertion − deletion AUC), plus the slow methods by deletion and insertion; the summary
sentences are derived from these numbers."""

from __future__ import annotations

import time
from statistics import mean
from typing import Any

import gallery

from cnnscan.metrics.leaderboard import advice, board_columns, leaderboard, marks, rank_rows
from cnnscan.metrics.outputs import method_curves
from cnnscan.metrics.plot import PALETTE, curves_image
from cnnscan.metrics.sanity import THRESHOLD
from cnnscan.render import png_bytes

METRICS = ("deletion_auc", "insertion_auc", "model_randomization", "completeness")
CHEAP = ("deletion_auc", "insertion_auc")  # for the slow methods: no re-runs


def boards(run: Any, log: Any = print) -> dict[str, list[dict[str, Any]]]:
    """Photo name -> ranked rows: the default-scan methods with every check, and the slow
    methods by deletion and insertion only (same curves, same seed: no re-runs)."""
    out = {}
    for photo in run.photos:
        began = time.perf_counter()
        common = {"steps": run.settings.trust_steps, "scan": photo.scan, "seed": 0}
        rows = leaderboard(
            run.model,
            photo.picture,
            run.attributions(photo.name, slow=False),
            METRICS,
            method_options=run.options(slow=False),
            **common,
        )
        slow = run.attributions(photo.name, slow=True)
        if slow:
            extra = leaderboard(run.model, photo.picture, slow, CHEAP, **common)
            rows += [dict(row, slow=True) for row in extra if not row["reference"]]
        out[photo.name] = rank_rows(rows)
        run.seconds[f"trust: {photo.name}"] = time.perf_counter() - began
        log(f"trust: {photo.name} {time.perf_counter() - began:.1f} s")
    return out


def _verdict(row: dict[str, Any]) -> str:
    check = row.get("model_randomization")
    if not check:
        return ""
    verdict = check["verdict"]
    return verdict if isinstance(verdict, str) else verdict[0]


def table(rows: list[dict[str, Any]]) -> list[str]:
    """A markdown table with the columns `cnnscan evaluate` prints."""
    present = [c.column for c in board_columns(rows)]
    lines = [
        "| rank | method | " + " | ".join(c.title for c in present) + " |",
        "|---" * (len(present) + 2) + "|",
    ]
    for row in rows:
        name = f"`{row['method']}`"
        if row["reference"]:
            name = f"*{row['method']} (chance)*"
        elif row.get("slow"):
            name += " (slow; deletion/insertion only)"
        name += f" {marks(row)}" if marks(row) else ""
        cells = [c.show(row[c.key]) if c.key in row else "" for c in present]
        lines.append(f"| {row['rank']} | {name} | " + " | ".join(cells) + " |")
    return lines


def summary(run: Any, results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Sentences computed from the rankings (nothing here is written by hand)."""
    methods = [info.name for info in run.methods if info.in_default_scan]
    ranks = {name: [] for name in methods}
    fails, below = set(), set()
    for rows in results.values():
        for row in rows:
            if row["method"] in ranks:
                ranks[row["method"]].append(row["rank"])
                if row.get("above_chance") is False:
                    below.add(row["method"])
                if _verdict(row) not in ("", "passes"):
                    fails.add(row["method"])
    order = sorted(methods, key=lambda name: mean(ranks[name]))
    passing = [name for name in order if name not in fails and name not in below]
    photos = " and ".join(results)
    lines = [
        f"- **Best on average** (mean rank over {photos}, among the methods of a scan): "
        + ", ".join(f"`{name}` ({mean(ranks[name]):.1f})" for name in order[:3])
        + ".",
    ]
    if passing:
        lines.append(
            "- **Ranked above chance on every photo and passing the randomization check**: "
            + ", ".join(f"`{name}`" for name in passing)
            + "."
        )
    if fails:
        lines.append(
            f"- **Fails model randomization** (Spearman ρ ≥ {THRESHOLD} between the map "
            "before and after randomizing the top block, on at least one photo — the map "
            "shows the image more than what the classifier computes): "
            + ", ".join(f"`{name}`" for name in order if name in fails)
            + "."
        )
    if below:
        lines.append(
            "- **Below a random map** on at least one photo (the model's confidence follows "
            "the map less than it follows chance): "
            + ", ".join(f"`{name}`" for name in order if name in below)
            + "."
        )
    return lines


def _chart(rows: list[dict[str, Any]], kind: str, title: str) -> bytes:
    """The `kind` curves of the three best methods and of the chance row."""
    best = [r for r in rows if not r["reference"] and "curves" in r][:3]
    chance = [r for r in rows if r["reference"] and "curves" in r][:1]
    drawn = [
        (row["method"], row["curves"][kind], PALETTE[i % len(PALETTE)])
        for i, row in enumerate([*best, *chance])
    ]
    fractions = (best or chance)[0]["curves"]["fraction"]
    return png_bytes(curves_image(fractions, drawn, size=(420, 280), title=title))


def files(run: Any, log: Any = print) -> dict[str, str | bytes]:
    """`trust.md` and its curve charts."""
    if run.boards is None:
        run.boards = boards(run, log)
    results = run.boards
    pictures: dict[str, bytes] = {}
    photos = {photo.name: photo for photo in run.photos}
    lines = [
        "# Which method should I trust?",
        "",
        *(gallery.preview_warning(run.settings) if run.settings.mode != "full" else []),
        "An explanation is only useful if it shows what the model used. This page ranks every "
        "method of the [gallery](gallery.md) on its two photos with the checks of "
        "[Evaluation](evaluation.md), computed by `tools/docs/trust.py` each time this site "
        "is built — the numbers below are this build's, not copied from anywhere.",
        "",
        "- **Deletion AUC** (lower is better): remove pixels from the most to the least "
        "relevant; a faithful map makes the class probability drop fast.",
        "- **Insertion AUC** (higher is better): insert pixels into a blurred copy in the same "
        "order; the probability should rise fast.",
        f"- **Model randomization** (Adebayo et al. 2018): the method is re-run with the top "
        f"block's weights randomized; a Spearman ρ ≥ {THRESHOLD} with the original map means "
        "the map does not depend on what the classifier learned.",
        "- **Completeness**: for methods whose maps should add up to the explained logit "
        "change (Integrated Gradients, LRP), how far they are from it.",
        "- ***random (chance)*** rows: a uniform-random map (per pixel, and at the coarsest "
        "layer resolution), ranked among the methods: a method below the one at its own "
        "resolution is not explaining (⚠).",
        "- **The ranking**: a map that fails the sanity check (✗) comes after every map that "
        "passes; within each group, by insertion − deletion AUC; a completeness error above "
        "5 % is a warning (⚠).",
        "",
        "## What these numbers say",
        "",
        *summary(run, results),
        "",
        "Two photos and one model are an illustration, not a benchmark: rankings change "
        "with the image, the class and the model. Check the methods on your own images with "
        "`cnnscan evaluate photo.jpg` (or the leaderboard in `cnnscan scan`'s report), and "
        "prefer a method that ranks above chance *and* passes the randomization check.",
    ]
    for name, rows in results.items():
        photo = photos[name]
        lines += [
            "",
            f"## {name}: {photo.class_id} {photo.label}",
            "",
            f"{run.settings.trust_steps} deletion/insertion steps (`cnnscan evaluate`: 50); "
            "the gallery's options (counts lowered) for the methods' re-runs.",
            "",
            *([f"**{advice(rows)}**", ""] if advice(rows) else []),
            *table(rows),
            "",
        ]
        for kind in ("deletion", "insertion"):
            path = f"trust/{name}-{kind}.png"
            pictures[path] = _chart(rows, kind, f"{kind}: {name}, best three and chance")
            lines.append(f"![{kind} curves on {name}]({path})")
        best = next(r for r in rows if not r["reference"])
        path = f"trust/{name}-best.png"
        pictures[path] = png_bytes(method_curves(best, size=(420, 280), title=best["method"]))
        lines += ["", f"Both curves of the best method, `{best['method']}`:", "", f"![]({path})"]
    return {"trust.md": "\n".join(lines) + "\n", **pictures}
