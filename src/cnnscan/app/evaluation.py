"""The evaluation view's computations: for one class of the grid, the library's method
leaderboard (deletion and insertion AUC, their curves, chance references, optionally the
model-randomization sanity check). The page shows the view only when the library has
`cnnscan.evaluate` (`core.evaluation_available`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cnnscan.app.core import Column, Workspace
from cnnscan.attribution import Attribution


def leaderboard_rows(
    ws: Workspace,
    columns: Sequence[Column],
    cells: Mapping[tuple[Column, int], Attribution],
    target: int,
    *,
    steps: int = 50,
    sanity: bool = False,
    progress: Callable[[int], object] | None = None,
) -> list[dict[str, Any]]:
    """`cnnscan.metrics.leaderboard.leaderboard` of the grid's cells for class `target`
    (one row per column, best first, random-map references among them), from the
    session's shared forward; cached like the cells."""
    from cnnscan.metrics.leaderboard import leaderboard

    attrs = {column.title: cells[(column, target)] for column in columns}
    metrics = ["deletion_auc", "insertion_auc", "completeness"]
    if sanity:
        metrics.append("model_randomization")
    key = (
        "leaderboard",
        int(target),
        tuple((c.method, c.layer, c.options) for c in columns),
        steps,
        sanity,
    )
    return ws.cached(
        key,
        lambda: leaderboard(
            ws.model,
            None,  # the maps explain the session's model input
            attrs,
            metrics,
            scan=ws.scan,
            steps=steps,
            method_options={c.title: c.option_values() for c in columns},
            progress=progress,
        ),
    )


def report_options(steps: int, sanity: bool) -> dict[str, Any]:
    """How the report describes a leaderboard computed in the page."""
    from cnnscan.metrics.sanity import THRESHOLD

    note = "" if sanity else "the sanity check was not ticked in the app's Evaluation tab"
    return {"mode": "app", "steps": steps, "threshold": THRESHOLD, "note": note}


def table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The leaderboard as table rows: rank, method (chance rows and the marks ✗ / ⚠ of
    `cnnscan.metrics.leaderboard.marks`), one column per metric column the rows have, titled
    as the metric registry titles it (numbers stay numbers, a check reads as its verdict),
    and the rows' warnings."""
    from cnnscan.metrics.leaderboard import board_columns, marks

    columns = board_columns(rows)
    shown = []
    for row in rows:
        mark = marks(row)
        line = {
            "rank": row["rank"],
            "method": row["method"]
            + (" (chance)" if row.get("reference") else "")
            + (f" {mark}" if mark else ""),
        }
        for c in columns:
            value = row.get(c.column.key)
            number = value is None or isinstance(value, int | float)
            line[c.column.title] = value if number else c.column.show(value)
        if row.get("warnings"):
            line["warnings"] = "; ".join(row["warnings"])
        shown.append(line)
    return shown


def legend(rows: Sequence[Mapping[str, Any]]) -> str:
    """What each column of `table` measures and which way is better, as Markdown."""
    from cnnscan.metrics.leaderboard import board_columns

    return "\n".join(
        f"- **{c.column.title}**: {c.better}. {c.description}" for c in board_columns(rows)
    )


def curves(rows: Sequence[Mapping[str, Any]], kind: str) -> dict[str, Any]:
    """{"fraction": x, method: probabilities, ...} of the deletion or insertion curves."""
    data: dict[str, Any] = {}
    for row in rows:
        found = row.get("curves")
        if not isinstance(found, Mapping) or kind not in found:
            continue
        data.setdefault("fraction", found["fraction"])
        data[row["method"]] = found[kind]
    return data
