"""`cnnscan evaluate`'s work: run the methods on one image, rank them, print the table and
write scores (JSON) and curves (PNG)."""

from __future__ import annotations

import json
import math
import re
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from cnnscan import render
from cnnscan.methods import get_methods, run_method
from cnnscan.metrics.leaderboard import advice, board_columns, leaderboard, marks
from cnnscan.metrics.plot import DELETION_COLOUR, INSERTION_COLOUR, PALETTE, curves_image
from cnnscan.metrics.registry import choose_metrics
from cnnscan.models import Model
from cnnscan.scan import make_scan
from cnnscan.targets import Targets


@dataclass
class Evaluation:
    """Ranked leaderboard rows for one image and class, with what produced them."""

    class_id: int
    label: str
    rows: list[dict[str, Any]]
    options: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


def evaluate_methods(
    model: Model,
    picture: Image.Image,
    methods: Sequence[str],
    *,
    target: Targets = "top1",
    metrics: Sequence[str] | None = None,
    **options: Any,
) -> Evaluation:
    """Explain `picture` with every method for one class (`target`: a class id or name, or
    "topK" for the K-th most probable class) and rank the maps."""
    began = time.perf_counter()
    infos = get_methods(methods)
    scan = make_scan(model, picture, infos)
    if isinstance(target, str) and target.lower().startswith("top"):
        k = int(target[3:] or 1)
        targets = scan.targets(f"top{k}")[:, k - 1 : k]
    else:
        targets = scan.targets([target] if not isinstance(target, list) else target)[:, :1]
    seconds = {"forward": time.perf_counter() - began}
    attrs = {}
    for info in infos:
        began = time.perf_counter()
        attrs[info.name] = run_method(scan, info, targets)
        seconds[info.name] = time.perf_counter() - began
    region = options.get("box") is not None or options.get("mask") is not None
    chosen = [info.name for info in choose_metrics(metrics or None, region)]
    began = time.perf_counter()
    rows = leaderboard(model, picture, attrs, chosen, **options)
    seconds["metrics"] = time.perf_counter() - began
    class_id = int(targets[0, 0])
    return Evaluation(
        class_id,
        model.labels[class_id] if class_id < len(model.labels) else "",
        rows,
        options,
        seconds,
    )


def table_lines(result: Evaluation) -> list[str]:
    """The ranked table as text lines: failing maps marked ✗, chance rows "(chance)", a
    row with a warning ⚠."""
    present = [c.column for c in board_columns(result.rows)]
    header = ["rank", "method", *(c.title for c in present)]
    body = []
    for row in result.rows:
        name = row["method"] + (" (chance)" if row["reference"] else "")
        name += f" {marks(row)}" if marks(row) else ""
        cells = [str(row["rank"]), name]
        cells += [c.show(row[c.key]) if c.key in row else "" for c in present]
        body.append(cells)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *body]
    ]


def legend_lines(result: Evaluation, width: int = 100) -> list[str]:
    """What each column of the table measures and which way is better, then what ✗ means
    and every row's warnings, wrapped at `width` characters."""
    lines = []
    for c in board_columns(result.rows):
        text = f"{c.column.title}: {c.better}. {c.description}"
        lines += textwrap.wrap(text, width, subsequent_indent="    ")
    if any(not row.get("trusted", True) for row in result.rows):
        lines.append("✗: fails a sanity check; ranked below every map that passes.")
    for row in result.rows:
        for warning in row.get("warnings", ()):
            lines += textwrap.wrap(f"⚠ {row['method']}: {warning}", width, subsequent_indent="    ")
    return lines


def print_table(result: Evaluation) -> None:
    print(f"class {result.class_id} {result.label}: by insertion − deletion AUC, failing maps last")
    sentence = advice(result.rows)
    if sentence:
        print(textwrap.fill(sentence, 100))
    for line in table_lines(result):
        print(line)
    for line in legend_lines(result):
        print(line)


def method_curves(row: dict[str, Any], size: tuple[int, int] = (480, 320), title: str = "") -> Any:
    """The deletion and insertion curves of one leaderboard row as an RGB array."""
    curves = row["curves"]
    drawn = [
        (kind, curves[kind], colour)
        for kind, colour in (("deletion", DELETION_COLOUR), ("insertion", INSERTION_COLOUR))
        if kind in curves
    ]
    return curves_image(curves["fraction"], drawn, size=size, title=title)


def write_evaluation(result: Evaluation, out: str | Path) -> Path:
    """scores.json plus curves/<method>.png and curves/{deletion,insertion}.png (all methods)."""
    out = Path(out)
    (out / "curves").mkdir(parents=True, exist_ok=True)
    options = {
        k: v if isinstance(v, str | int | float | bool | type(None)) else str(v)
        for k, v in result.options.items()
    }
    document = {
        "class_id": result.class_id,
        "label": result.label,
        "options": options,
        "seconds": result.seconds,
        "ranking": result.rows,
    }
    (out / "scores.json").write_text(json.dumps(json_ready(document), indent=2, allow_nan=False))
    with_curves = [row for row in result.rows if "curves" in row]
    for row in with_curves:
        title = f"{row['method']} for {result.class_id} {result.label}"
        (out / "curves" / f"{file_stem(row['method'])}.png").write_bytes(
            render.png_bytes(method_curves(row, title=title))
        )
    for kind in ("deletion", "insertion"):
        drawn = [
            (row["method"], row["curves"][kind], PALETTE[i % len(PALETTE)])
            for i, row in enumerate(with_curves)
            if kind in row["curves"]
        ]
        if drawn:
            fractions = with_curves[0]["curves"]["fraction"]
            picture = curves_image(fractions, drawn, size=(640, 420), title=f"{kind} curves")
            (out / "curves" / f"{kind}.png").write_bytes(render.png_bytes(picture))
    return out


def file_stem(name: str) -> str:
    """A method or reference name as a portable file name ("random 7×7" -> "random_7x7")."""
    return re.sub(r"[^\w.-]+", "_", name.replace("×", "x"))


def json_ready(value: Any) -> Any:
    """Scores as strict JSON: NaN (an undefined score) becomes null."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    return value
