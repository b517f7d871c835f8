"""The summary of a batch run's output folder, computed part by part (constant memory):
per-method means of the metric columns, pointing-game accuracy where boxes exist, top-1
accuracy where labels exist, per-class counts, and the errors. Written as JSON and HTML."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections import Counter, defaultdict
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from cnnscan.batch.store import Results

ERRORS_SHOWN = 50


class _Mean:
    """A running mean of the non-null values seen."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, values: list[float | None]) -> None:
        for value in values:
            if value is not None and math.isfinite(value):
                self.total += value
                self.count += 1

    def value(self) -> float | None:
        return self.total / self.count if self.count else None


def summarize(out: str | Path) -> dict[str, Any]:
    """The summary of the committed parts of `out` (see the module docstring)."""
    results = Results(out)
    metric_columns = results.settings.get("metric_columns", [])
    rows_per_method: Counter[str] = Counter()
    probability: defaultdict[str, _Mean] = defaultdict(_Mean)
    metrics: defaultdict[str, defaultdict[str, _Mean]] = defaultdict(lambda: defaultdict(_Mean))
    predicted: Counter[int] = Counter()
    labelled: Counter[int] = Counter()
    correct: Counter[int] = Counter()
    names: dict[int, str] = {}
    stages: Counter[str] = Counter()
    shown_errors: list[dict[str, Any]] = []
    images = explained = 0
    for part in results.parts():
        images += len(json.loads((results.out / "manifest" / f"{part}.json").read_text())["images"])
        rows = _read(results, "rows", part, ["method", "probability", *metric_columns])
        for method in set(rows["method"]):
            chosen = [i for i, m in enumerate(rows["method"]) if m == method]
            rows_per_method[method] += len(chosen)
            probability[method].add([rows["probability"][i] for i in chosen])
            for column in metric_columns:
                metrics[method][column].add([rows[column][i] for i in chosen])
        top1 = _read(results, "predictions", part, ["rank", "class_id", "class_name", "label"])
        for rank, class_id, name, label in zip(*top1.values(), strict=True):
            if rank != 1:
                continue
            explained += 1
            predicted[class_id] += 1
            names[class_id] = name
            if label is not None:
                labelled[label] += 1
                correct[label] += int(class_id == label)
        errors = _read(results, "errors", part, ["path", "image_id", "stage", "reason"])
        stages.update(errors["stage"])
        for i in range(min(len(errors["path"]), ERRORS_SHOWN - len(shown_errors))):
            shown_errors.append({key: values[i] for key, values in errors.items()})
    per_method = {
        method: {
            "rows": rows_per_method[method],
            "mean_probability": probability[method].value(),
            **{f"mean_{c}": metrics[method][c].value() for c in metric_columns},
            **{f"count_{c}": metrics[method][c].count for c in metric_columns},
        }
        for method in results.settings["methods"]
    }
    classes = sorted(set(predicted) | set(labelled), key=lambda c: (-predicted[c], c))
    return {
        "settings": results.settings,
        "images": images,
        "explained": explained,
        "errors": sum(stages.values()),
        "errors_by_stage": dict(stages),
        "rows": sum(rows_per_method.values()),
        "top1_accuracy": sum(correct.values()) / sum(labelled.values()) if labelled else None,
        "labelled": sum(labelled.values()),
        "methods": per_method,
        "classes": [
            {
                "class_id": c,
                "class_name": names.get(c),
                "predicted": predicted[c],
                "labelled": labelled[c],
                "correct": correct[c] if labelled[c] else None,
            }
            for c in classes
        ],
        "first_errors": shown_errors,
    }


def _read(results: Results, table: str, part: str, columns: list[str]) -> dict[str, list]:
    import pyarrow.parquet as pq

    data = pq.read_table(results.out / table / f"{part}.parquet", columns=columns)
    return {name: data.column(name).to_pylist() for name in columns}


def write_summary(
    out: str | Path, *, seconds: float | None = None, images_this_run: int | None = None
) -> dict[str, Any]:
    """Write OUT/summary.json and OUT/summary.html; returns the summary."""
    out = Path(out)
    summary = summarize(out)
    summary["generated"] = dt.datetime.now().isoformat(timespec="seconds")
    if seconds is not None and images_this_run is not None:
        summary["this_run"] = {
            "images": images_this_run,
            "seconds": round(seconds, 3),
            "images_per_second": images_this_run / seconds
            if seconds > 0 and images_this_run
            else None,
        }
    _replace(out / "summary.json", json.dumps(summary, indent=2))
    _replace(out / "summary.html", _template().render(s=summary))
    return summary


def _replace(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def _template() -> jinja2.Template:
    text = resources.files("cnnscan").joinpath("templates/batch.html.j2").read_text("utf-8")
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(text)
