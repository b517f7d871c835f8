"""The full scan of one image: every method for the top-k classes, written as a
self-contained HTML report (images embedded) plus PNG/NPY/JSON files."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import torch

import cnnscan
from cnnscan import render
from cnnscan.attribution import Attribution
from cnnscan.display import map_picture
from cnnscan.errors import TargetError
from cnnscan.layers import LayerRow
from cnnscan.learned import conv_layers, depth_layers, filters, top_channels
from cnnscan.methods import get_method, list_methods, run_method
from cnnscan.models import Model, ModelLike, as_model
from cnnscan.receptive import ReceptiveField, receptive_fields
from cnnscan.scan import Scan, make_scan
from cnnscan.synthesis import class_image

CELL_PX = 160
LEARNED_CHANNELS = 16  # feature maps shown per layer in the report
LEARNED_TILE_PX = 64  # their size in pixels
CLASS_IMAGE_STEPS = 48  # the top-1 class image: a preview, a second or two on a CPU
CLASS_IMAGE_PX = 128


@dataclass
class Learned:
    """The report's "What the network learned" pictures (uint8 RGB)."""

    filters_layer: str | None = None
    filters: np.ndarray | None = None  # first convolution's filters, min-max per filter
    feature_maps: list[tuple[str, tuple[int, ...], np.ndarray]] = field(default_factory=list)
    class_image: np.ndarray | None = None  # synthesized for the top-1 class (`class_image`)


@dataclass
class ScanResult:
    """Everything a full scan computed, before it is written out."""

    model: Model
    image_name: str
    view: np.ndarray  # the RGB picture the model saw
    preprocessing: str  # how it was made from the photo, and where that pipeline comes from
    predictions: list[dict[str, Any]]
    attributions: dict[str, Attribution]
    seconds: dict[str, float] = field(default_factory=dict)
    layers: list[Any] = field(default_factory=list)
    learned: Learned = field(default_factory=Learned)
    receptive: dict[str, ReceptiveField] = field(default_factory=dict)
    leaderboard: list[dict[str, Any]] = field(default_factory=list)  # see metrics.leaderboard
    leaderboard_options: dict[str, Any] = field(default_factory=dict)


def default_methods(full: bool = False) -> list[str]:
    """The methods of a scan: every registered method that runs in seconds on one image
    (`MethodInfo.in_default_scan`), or with `full=True` every registered method."""
    return [m.name for m in list_methods() if full or getattr(m, "in_default_scan", True)]


def run_scan(
    model: ModelLike,
    image: Any,
    *,
    methods: Sequence[str] | None = None,
    top_k: int = 5,
    image_name: str = "image",
    device: torch.device | str | None = None,
    progress: Callable[[str], None] | None = None,
    class_image_steps: int = CLASS_IMAGE_STEPS,
    evaluate: str = "default",
    max_memory: int | float | str | None = None,
) -> ScanResult:
    """One shared forward, then every method for the top-k classes, each timed;
    `progress(name)` is called as each method finishes. `class_image_steps=0` skips the
    synthesized image of the top-1 class. `evaluate` ranks the methods' maps of the top-1
    class in a leaderboard: "default" (the cheap checks, `LEADERBOARD`), "full" (also the
    full cascade and the random-class check) or "none". `max_memory` caps the working
    memory of a batch (see `cnnscan.explain`)."""
    started = time.perf_counter()
    model = as_model(model)
    infos = [get_method(name) for name in (methods or default_methods())]
    picture = cnnscan.load_image(image)
    scan = make_scan(
        model, model.preprocessing(picture), infos, device=device, max_memory=max_memory
    )
    seconds = {"load + forward": time.perf_counter() - started}
    if top_k < 1:
        raise TargetError(f"top_k must be at least 1, got {top_k}")
    top_k = min(top_k, scan.logits.shape[1])  # a 3-class model has no top-5
    targets = scan.targets(f"top{top_k}")
    attributions = {}
    for info in infos:
        began = time.perf_counter()
        attributions[info.name] = run_method(scan, info, targets)
        seconds[info.name] = time.perf_counter() - began
        if progress:
            progress(info.name)
    began = time.perf_counter()
    layers = scan.layer_table()
    seconds["layer table"] = time.perf_counter() - began
    began = time.perf_counter()
    learned = learned_pictures(scan, layers)
    seconds["what the network learned"] = time.perf_counter() - began
    if class_image_steps > 0:
        began = time.perf_counter()
        top1 = int(targets[0, 0])
        synthesized = class_image(
            model, top1, steps=class_image_steps, size=CLASS_IMAGE_PX, device=device
        )
        learned.class_image = synthesized.image
        seconds["class image"] = time.perf_counter() - began
    began = time.perf_counter()
    receptive = receptive_fields(model, scan.inputs[:1])
    seconds["receptive fields"] = time.perf_counter() - began
    board, board_options = [], {}
    if evaluate != "none":
        parts: dict[str, float] = {}
        board, board_options = _leaderboard(model, picture, scan, attributions, evaluate, parts)
        seconds.update({f"leaderboard: {name}": value for name, value in parts.items()})
    return ScanResult(
        model=model,
        image_name=image_name,
        view=np.asarray(model.preprocessing.view(picture)),
        preprocessing=model.preprocessing.describe(origin=True),
        predictions=scan.predictions(top_k)[0],
        attributions=attributions,
        seconds=seconds,
        layers=layers,
        learned=learned,
        receptive=receptive,
        leaderboard=board,
        leaderboard_options=board_options,
    )


def learned_pictures(scan: Scan, rows: Sequence[LayerRow]) -> Learned:
    """The first convolution's filters and the strongest feature maps of three layers at
    increasing depth, read from the scan's forward (no new forward)."""
    convs = conv_layers(scan.model)
    learned = Learned()
    if convs:
        learned.filters_layer = convs[0]
        learned.filters = render.filter_grid(filters(scan.model, convs[0]), tile_px=24)
    for layer in depth_layers(rows):
        maps = scan.activations(layer).detach()[0]
        channels = top_channels(maps, LEARNED_CHANNELS)
        picture = render.feature_grid(maps, channels, tile_px=LEARNED_TILE_PX)
        learned.feature_maps.append((layer, tuple(maps.shape), picture))
    return learned


# What the scan's leaderboard computes: "default" keeps the scan in seconds, "full" adds the
# whole cascade of model randomization and the random-class check, which re-run every method
# once per block / once more.
LEADERBOARD = {
    "default": {
        "metrics": ("deletion_auc", "insertion_auc", "model_randomization", "completeness"),
        "steps": 20,
    },
    "full": {
        "metrics": (
            "deletion_auc",
            "insertion_auc",
            "model_randomization",
            "target_randomization",
            "completeness",
        ),
        "steps": 50,
        "cascade": True,
    },
}


def _leaderboard(model, picture, scan, attributions, mode: str, timings: dict[str, float]):
    """The top-1 class's leaderboard rows and the options that produced them."""
    from tqdm import tqdm

    from cnnscan.errors import MetricError
    from cnnscan.metrics.leaderboard import leaderboard
    from cnnscan.metrics.sanity import THRESHOLD, private_copy

    if mode not in LEADERBOARD:
        raise ValueError(f"evaluate must be one of none, {', '.join(LEADERBOARD)}; got {mode!r}")
    settings = dict(LEADERBOARD[mode])
    metrics = list(settings.pop("metrics"))
    note = ""
    try:  # a model that cannot be copied is never randomized: rank it without that check
        private_copy(model)
    except MetricError as e:
        metrics.remove("model_randomization")
        note = str(e)
    with tqdm(desc="leaderboard", unit="forward", disable=None, leave=False) as bar:
        rows = leaderboard(
            model,
            picture,
            attributions,
            metrics,
            scan=scan,
            progress=bar.update,
            timings=timings,
            **settings,
        )
    options = {"mode": mode, "metrics": metrics, "threshold": THRESHOLD, "note": note}
    return rows, {**options, **settings}


def _b64(rgb: np.ndarray) -> str:
    return base64.b64encode(render.png_bytes(rgb)).decode("ascii")


def _notes(attr: Attribution) -> list[dict[str, Any]]:
    notes = []
    relative = attr.extras.get("completeness_error_relative")
    if isinstance(relative, torch.Tensor):
        worst = float(relative.max())
        notes.append(
            {
                "text": f"completeness error ≤ {worst:.2%} of |f(x) − f(x′)| "
                f"({attr.extras.get('n_steps')} steps, baseline {attr.extras.get('baseline')})",
                "warn": worst > 0.05,
            }
        )
    if "warning" in attr.extras:
        notes.append({"text": attr.extras["warning"], "warn": True})
    return notes


def write_report(result: ScanResult, out: str | Path) -> Path:
    """Write report.html, predictions.json, timings.json and per-method PNG/NPY files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.json").write_text(json.dumps(result.predictions, indent=2))
    (out / "timings.json").write_text(json.dumps(result.seconds, indent=2))
    infos = [get_method(name) for name in result.attributions]
    for info in infos:
        result.attributions[info.name].save(out / "maps" / info.name, kind=info.view)
    methods = [
        {
            "name": info.name,
            "family": info.family,
            "description": info.description,
            "cost": info.cost,
            "paper": info.paper,
            "view": info.view,
            "seconds": result.seconds.get(info.name, 0.0),
            "notes": _notes(result.attributions[info.name]),
        }
        for info in infos
    ]
    learned = _write_learned(result.learned, out / "learned")
    grid = []
    for t, prediction in enumerate(result.predictions):
        cells = []
        for info in infos:
            attr = result.attributions[info.name]
            caption = ""
            relative = attr.extras.get("completeness_error_relative")
            if isinstance(relative, torch.Tensor):
                caption = f"completeness err {float(relative[0, t]):.1%}"
            cells.append(
                {
                    "png": _b64(map_picture(attr, 0, t, result.view)),
                    "alt": f"{info.name} for {prediction['label']}",
                    "caption": caption,
                }
            )
        grid.append(
            {
                "label": f"{prediction['class_id']} {prediction['label']}",
                "probability": prediction["probability"],
                "cells": cells,
            }
        )
    if result.leaderboard:
        from cnnscan.metrics.outputs import json_ready

        document = {"options": result.leaderboard_options, "ranking": result.leaderboard}
        (out / "leaderboard.json").write_text(
            json.dumps(json_ready(document), indent=2, allow_nan=False)
        )
    html = _template().render(
        model_name=result.model.name,
        image_name=result.image_name,
        input_size=result.model.preprocessing.size,
        preprocessing=result.preprocessing,
        device=str(result.model.device),
        generated=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        version=cnnscan.__version__,
        input_png=_b64(result.view),
        predictions=result.predictions,
        methods=methods,
        grid=grid,
        views=_top1_views(result),
        timings=list(result.seconds.items()),
        layers=result.layers,
        receptive=result.receptive,
        learned=learned,
        cell_px=CELL_PX,
        leaderboard=_leaderboard_rows(result),
        leaderboard_options=result.leaderboard_options,
    )
    path = out / "report.html"
    path.write_text(html, encoding="utf-8")
    return path


def _write_learned(learned: Learned, out: Path) -> dict[str, Any]:
    """Write the learned-pictures PNGs and return what the template shows."""
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    if learned.filters is not None:
        (out / f"filters_{learned.filters_layer}.png").write_bytes(
            render.png_bytes(learned.filters)
        )
        figures.append(
            {
                "png": _b64(learned.filters),
                "alt": f"filters of {learned.filters_layer}",
                "caption": f"filters of {learned.filters_layer} (first convolution), "
                "min-max per filter",
            }
        )
    for layer, shape, picture in learned.feature_maps:
        name = layer.replace("@", "_call")
        (out / f"features_{name}.png").write_bytes(render.png_bytes(picture))
        figures.append(
            {
                "png": _b64(picture),
                "alt": f"feature maps of {layer}",
                "caption": f"{layer} ({'×'.join(map(str, shape))}): the "
                f"{min(LEARNED_CHANNELS, shape[0])} channels of highest mean activation, "
                "one colour scale",
            }
        )
    class_image = None
    if learned.class_image is not None:
        (out / "class_image.png").write_bytes(render.png_bytes(learned.class_image))
        class_image = _b64(learned.class_image)
    return {"figures": figures, "class_image": class_image}


def _leaderboard_rows(result: ScanResult) -> list[dict[str, Any]]:
    """The leaderboard as the template shows it: numbers, small curve PNGs, verdicts."""
    from cnnscan.metrics.outputs import method_curves

    rows = []
    for row in result.leaderboard:
        model_check = row.get("model_randomization") or {}
        target_check = row.get("target_randomization") or {}
        rows.append(
            {
                "rank": row["rank"],
                "method": row["method"],
                "reference": row["reference"],
                "deletion": row.get("deletion_auc"),
                "insertion": row.get("insertion_auc"),
                "score": row.get("score"),
                "curves": _b64(method_curves(row, size=(120, 80))) if "curves" in row else "",
                "verdict": model_check.get("verdict", ""),
                "model_rho": (model_check.get("spearman") or [None])[0],
                "model_ssim": (model_check.get("ssim") or [None])[0],
                "cascade": list(
                    zip(
                        model_check.get("blocks", []),
                        model_check.get("spearman", []),
                        model_check.get("ssim", []),
                        strict=True,
                    )
                ),
                "target_verdict": target_check.get("verdict", ""),
                "target_rho": target_check.get("spearman"),
                "completeness": row.get("completeness"),
            }
        )
    return rows


def _top1_views(result: ScanResult) -> list[dict[str, str]]:
    """The classic saliency views (colour, grayscale, ±) of the gradient-like methods."""
    views = []
    for name in ("gradient", "guided_backprop", "deconvnet"):
        attr = result.attributions.get(name)
        if attr is None:
            continue
        for kind in ("colour", "grayscale", "positive", "negative"):
            views.append({"title": f"{name} · {kind}", "png": _b64(attr.image(0, 0, kind))})
    return views


def _template() -> jinja2.Template:
    text = resources.files("cnnscan").joinpath("templates/report.html.j2").read_text("utf-8")
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(text)
