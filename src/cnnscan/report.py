"""The full scan of one image: every method for the top-k classes, written as a
self-contained HTML report (pictures embedded, one screen wide) plus the raw maps and JSON
files. How each map is drawn: `cnnscan.report_pictures`."""

from __future__ import annotations

import datetime as dt
import functools
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
from cnnscan.choices import CLASS_IMAGE_STEPS
from cnnscan.concept import Concepts, concepts
from cnnscan.concept.page import page_html
from cnnscan.engine.memory import trim
from cnnscan.engine.threads import SharedWork, beside, single_threaded
from cnnscan.layers import LayerRow
from cnnscan.learned import conv_layers, depth_layers, filters, top_channels
from cnnscan.methods import MethodInfo, get_method, get_methods, list_methods, run_method
from cnnscan.models import Model, ModelLike, as_model
from cnnscan.receptive import ReceptiveField, receptive_fields
from cnnscan.report_pictures import LAYER_CMAP, data_uri, map_cells, map_notes, view_cells
from cnnscan.scan import Scan, make_scan
from cnnscan.synthesis import class_image
from cnnscan.targets import checked_top_k

LEARNED_CHANNELS = 16  # feature maps shown per layer in the report
LEARNED_TILE_PX = 64  # their size in pixels
CLASS_IMAGE_PX = 128
CONCEPTS_TOP = 6  # concepts of the top-1 class in a scan
CLASS_IMAGE_SHOWN_PX = 224  # the class image is shown at least this large (whole multiples)


@dataclass
class Learned:
    """The report's "What the network learned" pictures (uint8 RGB)."""

    filters_layer: str | None = None
    filters: np.ndarray | None = None  # first convolution's filters, min-max per filter
    feature_maps: list[tuple[str, tuple[int, ...], np.ndarray]] = field(default_factory=list)
    class_image: np.ndarray | None = None  # synthesized for the top-1 class (`class_image`)
    class_image_steps: int = 0
    class_image_probability: float | None = None  # the model's probability of that class


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
    concepts: Concepts | None = None  # of the top-1 class at the default layer


def default_methods(full: bool = False) -> list[str]:
    """The methods of a scan: every registered method that runs in seconds on one image
    (`MethodInfo.in_default_scan`), or with `full=True` every registered method."""
    return [m.name for m in list_methods() if full or getattr(m, "in_default_scan", True)]


class ScanObserver:
    """What a scan tells while it runs (the command line prints it; the default says
    nothing): the top-k as soon as the forward is done, the first map of the top-1 class,
    and each stage with its amount of work, advanced with `stage(...)(done)`."""

    def predictions(self, rows: list[dict[str, Any]]) -> None:
        """The top-k table, right after the shared forward."""

    def first_map(self, attr: Attribution, view: np.ndarray) -> None:
        """The first method's map for the top-1 class (Grad-CAM when it is scanned)."""

    @contextmanager
    def stage(self, name: str, total: int, unit: str) -> Iterator[Callable[[int], object]]:
        """A stage of `total` units; the block advances it by calling the yielded function."""
        yield lambda done: None


FIRST_METHOD = "gradcam"  # computed first, so a user sees a map within seconds

# The default scan's settings for the methods that sample, so that a scan takes seconds:
# each sample costs a forward and a backward per class. Maps at these settings against the
# library's defaults: docs/measurements.md. `evaluate="full"` (`cnnscan scan --full`) runs
# the defaults.
QUICK_OPTIONS: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"n_steps": 16},
    "smoothgrad": {"n_samples": 10},
    "gradient_shap": {"n_samples": 10},
}


def run_scan(
    model: ModelLike,
    image: Any,
    *,
    methods: Sequence[str] | None = None,
    top_k: int | None = None,
    image_name: str = "image",
    device: torch.device | str | None = None,
    observer: ScanObserver | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    class_image_steps: int = CLASS_IMAGE_STEPS,
    evaluate: str = "default",
    max_memory: int | float | str | None = None,
    concepts_top: int = CONCEPTS_TOP,
) -> ScanResult:
    """One shared forward, then every method for the `top_k` most probable classes (default
    5, at most the model's classes; more is a TargetError), each timed; `observer` hears the
    predictions, the first map and every stage as it goes. `options` {method: options}
    (default: `QUICK_OPTIONS`, or the library's defaults with `evaluate="full"`).
    `class_image_steps=0` skips the
    synthesized image of the top-1 class. `evaluate` ranks the methods' maps of the top-1
    class in a leaderboard: "default" (the cheap checks, `LEADERBOARD`), "full" (also the
    full cascade and the random-class check) or "none". `max_memory` caps the working
    memory of a batch (see `cnnscan.explain`). `concepts_top` channels of the default
    layer are the top-1 class's concepts (`cnnscan.concepts`, LRP, without the synthesized
    pictures); 0 skips them. Torch runs one thread per op during the scan (restored after)
    and independent work runs beside it on a second thread (`cnnscan.engine.threads`)."""
    started = time.perf_counter()
    observer = observer or ScanObserver()
    model = as_model(model)
    top_k = checked_top_k(top_k, model.num_classes)
    infos = get_methods(default_methods() if methods is None else methods)
    infos.sort(key=lambda info: info.name != FIRST_METHOD)  # stable: the rest keep their order
    if options is None:
        options = {} if evaluate == "full" else QUICK_OPTIONS
    options = {info.name: dict(options.get(info.name, {})) for info in infos}
    picture = cnnscan.load_image(image)
    with single_threaded() as lane:
        scan = make_scan(
            model, model.preprocessing(picture), infos, device=device, max_memory=max_memory
        )
        seconds = {"load + forward": time.perf_counter() - started}
        scan.prepare_inference()  # the fast engine for the leaderboard builds while methods run
        targets = scan.targets(f"top{top_k}")
        view = np.asarray(model.preprocessing.view(picture))
        observer.predictions(scan.predictions(top_k)[0])
        attributions: dict[str, Attribution] = {}
        with observer.stage("methods", len(infos), "method") as advance:
            done = _Counter(advance)

            def run(info: MethodInfo) -> None:
                began = time.perf_counter()
                attr = run_method(scan, info, targets, options=options[info.name])
                attributions[info.name] = attr
                seconds[info.name] = time.perf_counter() - began
                if info is infos[0]:
                    observer.first_map(attr, view)
                done.add()

            run(infos[0])
            # Methods with passes of their own go in both lanes: the other core starts them
            # while this one runs the rest (sharing the scan's forward), then helps.
            alone = {info.name: info.runs_apart(options[info.name]) for info in infos[1:]}
            apart = SharedWork((info for info in infos[1:] if alone[info.name]), run)
            with beside(lane, apart.drain):
                for info in infos[1:]:
                    if not alone[info.name]:
                        run(info)
                layers, learned, found = _learned_and_concepts(
                    model, scan, targets, concepts_top, seconds, observer
                )
                apart.drain()
                if class_image_steps > 0:
                    _add_class_image(
                        model,
                        scan,
                        int(targets[0, 0]),
                        class_image_steps,
                        learned,
                        seconds,
                        observer,
                        device,
                    )
        scan.release()  # the graph and activations: what follows needs neither (or runs again)
        trim()
        began = time.perf_counter()
        receptive = receptive_fields(model, scan.inputs[:1])
        seconds["receptive fields"] = time.perf_counter() - began
        board, board_options = [], {}
        trim()
        if evaluate != "none":
            parts: dict[str, float] = {}
            board, board_options = _leaderboard(
                model, picture, scan, attributions, evaluate, parts, observer, options, lane
            )
            seconds.update({f"leaderboard: {name}": value for name, value in parts.items()})
    return ScanResult(
        model=model,
        image_name=image_name,
        view=view,
        preprocessing=model.preprocessing.describe(origin=True),
        predictions=scan.predictions(top_k)[0],
        attributions={info.name: attributions[info.name] for info in _registry_order(infos)},
        seconds=seconds,
        layers=layers,
        learned=learned,
        receptive=receptive,
        leaderboard=board,
        leaderboard_options=board_options,
        concepts=found,
    )


class _Counter:
    """Counts finished units from any thread and reports the count to a stage."""

    def __init__(self, advance: Callable[[int], object]):
        self.advance, self.done, self.lock = advance, 0, threading.Lock()

    def add(self) -> None:
        with self.lock:
            self.done += 1
            self.advance(self.done)


def _learned_and_concepts(
    model: Model,
    scan: Scan,
    targets: torch.Tensor,
    concepts_top: int,
    seconds: dict[str, float],
    observer: ScanObserver,
) -> tuple[list[LayerRow], Learned, Concepts | None]:
    """The layer table, what the network learned and the top-1 class's concepts, timed."""
    began = time.perf_counter()
    layers = scan.layer_table()
    seconds["layer table"] = time.perf_counter() - began
    began = time.perf_counter()
    learned = learned_pictures(scan, layers)
    seconds["what the network learned"] = time.perf_counter() - began
    found = None
    if concepts_top > 0:
        began = time.perf_counter()
        with observer.stage("concepts", 1, "target") as advance:
            found = concepts(
                model, None, targets[:, :1], top=concepts_top, pictures=False, scan=scan
            )
            advance(1)
        seconds["concepts"] = time.perf_counter() - began
    return layers, learned, found


def _add_class_image(
    model: Model,
    scan: Scan,
    top1: int,
    steps: int,
    learned: Learned,
    seconds: dict[str, float],
    observer: ScanObserver,
    device: torch.device | str | None,
) -> None:
    """Synthesize the top-1 class's image into `learned`, with its probability, timed."""
    began = time.perf_counter()
    with observer.stage("class image", steps, "step") as advance:
        synthesized = class_image(
            model,
            top1,
            steps=steps,
            size=CLASS_IMAGE_PX,
            device=device,
            callback=lambda step, _: advance(step),
        )
    learned.class_image = synthesized.image
    learned.class_image_steps = len(synthesized.history)
    pixels = model.preprocessing.normalize(synthesized.pixels[:1].to(scan.device))
    learned.class_image_probability = float(scan.logits_at(pixels).softmax(1)[0, top1])
    seconds["class image"] = time.perf_counter() - began


def _registry_order(infos: Sequence[MethodInfo]) -> list[MethodInfo]:
    """The methods as the registry lists them (the report's column order)."""
    rank = {info.name: i for i, info in enumerate(list_methods())}
    return sorted(infos, key=lambda info: rank.get(info.name, len(rank)))


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
        "steps": 10,
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


def _leaderboard(
    model,
    picture,
    scan,
    attributions,
    mode: str,
    timings: dict[str, float],
    observer,
    options,
    lane,
):
    """The top-1 class's leaderboard rows and the options that produced them."""
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
    curves = sum(m in ("deletion_auc", "insertion_auc") for m in metrics)
    estimate = curves * (settings["steps"] - 1) * (len(attributions) + 2)  # + random maps
    with observer.stage("leaderboard", estimate, "forward") as advance:
        done = 0

        def progress(n: int) -> None:
            nonlocal done
            done += n
            advance(done)

        rows = leaderboard(
            model,
            picture,
            attributions,
            metrics,
            scan=scan,
            progress=progress,
            timings=timings,
            method_options=options,
            lane=lane,
            **settings,
        )
    options = {"mode": mode, "metrics": metrics, "threshold": THRESHOLD, "note": note}
    return rows, {**options, **settings}


def write_report(result: ScanResult, out: str | Path, *, all_maps: bool = False) -> Path:
    """Write report.html (one page, pictures embedded), predictions.json, timings.json,
    leaderboard.json, maps.npz (every method's raw map of the first class) with maps.json
    (each method's summary) and learned/ (PNGs). `all_maps=True` also writes maps/METHOD/
    with a PNG and an NPY per map and class (`Attribution.save`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.json").write_text(json.dumps(result.predictions, indent=2))
    (out / "timings.json").write_text(json.dumps(result.seconds, indent=2))
    infos = [get_method(name) for name in result.attributions]
    write_maps(result, out)
    if all_maps:
        for info in infos:
            result.attributions[info.name].save(out / "maps" / info.name, kind=info.view)
    methods = [
        {
            "name": info.name,
            "family": info.family,
            "description": info.description,
            "cost": info.cost,
            "paper": info.paper,
            "seconds": result.seconds.get(info.name, 0.0),
            "notes": map_notes(result.attributions[info.name]),
        }
        for info in infos
    ]
    descriptions = {info.name: info.description for info in infos}
    labels = [prediction["label"] for prediction in result.predictions]
    cells = [map_cells(attr, result.view, labels) for attr in result.attributions.values()]
    classes = [
        {
            "label": f"{prediction['class_id']} {prediction['label']}",
            "probability": prediction["probability"],
            "cells": [column[t] for column in cells],
        }
        for t, prediction in enumerate(result.predictions)
    ]
    if result.leaderboard:
        from cnnscan.metrics.outputs import json_ready

        document = {"options": result.leaderboard_options, "ranking": result.leaderboard}
        (out / "leaderboard.json").write_text(
            json.dumps(json_ready(document), indent=2, allow_nan=False)
        )
    if result.concepts is not None:
        concepts_json = json.dumps(result.concepts.summary(), indent=1)
        (out / "concepts.json").write_text(concepts_json, encoding="utf-8")
    html = _template().render(
        model_name=result.model.name,
        image_name=result.image_name,
        input_size=result.model.preprocessing.size,
        preprocessing=result.preprocessing,
        device=str(result.model.device),
        generated=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        version=cnnscan.__version__,
        input_uri=data_uri(result.view),
        predictions=result.predictions,
        methods=methods,
        descriptions=descriptions,
        classes=classes,
        views=[
            cell
            for name in VIEW_METHODS
            if name in result.attributions
            for cell in view_cells(result.attributions[name])
        ],
        timings=list(result.seconds.items()),
        total_seconds=sum(result.seconds.values()),
        layers=result.layers,
        receptive=result.receptive,
        learned=_write_learned(result.learned, out / "learned"),
        board=_board(result),
        concepts=None if result.concepts is None else page_html(result.concepts, fragment=True),
        colour_bars={name: render.css_gradient(name) for name in BAR_CMAPS},
        outlier_perc=render.OUTLIER_PERC,
    )
    path = out / "report.html"
    path.write_text(html, encoding="utf-8")
    return path


VIEW_METHODS = ("gradient", "guided_backprop", "deconvnet")  # the top-1 views section
BAR_CMAPS = (LAYER_CMAP, render.SEQUENTIAL, render.DIVERGING, "gray")


def write_maps(result: ScanResult, out: Path) -> Path:
    """maps.npz: each method's raw signed map (C, h, w) of the first class, float32, under
    the key "METHOD_classID"; and maps.json: each method's summary (layer, targets, scores,
    completeness errors)."""
    path = out / "maps.npz"
    first = {
        f"{name}_class{int(attr.targets[0, 0])}": attr.maps[0, 0].detach().float().cpu().numpy()
        for name, attr in result.attributions.items()
    }
    np.savez_compressed(path, **first)
    summaries = {name: attr.summary() for name, attr in result.attributions.items()}
    (out / "maps.json").write_text(json.dumps(summaries, indent=1))
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
                "uri": data_uri(learned.filters, lossless=True),
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
                "uri": data_uri(picture, lossless=True),
                "alt": f"feature maps of {layer}",
                "caption": f"{layer} ({'×'.join(map(str, shape))}): the "
                f"{min(LEARNED_CHANNELS, shape[0])} channels of highest mean activation, "
                "one colour scale",
            }
        )
    class_image = None
    if learned.class_image is not None:
        (out / "class_image.png").write_bytes(render.png_bytes(learned.class_image))
        size = max(learned.class_image.shape[:2])
        class_image = {
            "uri": data_uri(learned.class_image, lossless=True),
            "px": size * max(1, -(-CLASS_IMAGE_SHOWN_PX // size)),  # whole multiples
            "size": "×".join(map(str, learned.class_image.shape[:2])),
            "steps": learned.class_image_steps,
            "probability": learned.class_image_probability,
        }
    return {"figures": figures, "class_image": class_image}


def _board(result: ScanResult) -> dict[str, Any]:
    """The leaderboard as the template shows it: the advice, the columns with what they
    measure, and per row its cells, marks, warnings and a small curves picture."""
    from cnnscan.metrics.leaderboard import advice, board_columns, marks
    from cnnscan.metrics.outputs import method_curves

    rows = result.leaderboard
    columns = board_columns(rows)
    shown = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c.column.key)
            text = c.column.show(value) if c.column.key in row else "—"
            cells.append({"text": text, "warn": _alarming(c.column.key, value)})
        cascade = (row.get("model_randomization") or {}).get
        shown.append(
            {
                "rank": row["rank"],
                "method": row["method"],
                "reference": row["reference"],
                "trusted": row.get("trusted", True),
                "marks": marks(row),
                "warnings": row.get("warnings", []),
                "cells": cells,
                "curves": data_uri(method_curves(row, size=(120, 80)), lossless=True)
                if "curves" in row
                else "",
                "cascade": list(zip(cascade("blocks", []), cascade("spearman", []), strict=True)),
            }
        )
    return {
        "advice": advice(rows),
        "columns": columns,
        "rows": shown,
        "options": result.leaderboard_options,
    }


def _alarming(key: str, value: Any) -> bool:
    """A leaderboard cell shown as a warning: a check that did not pass, a completeness
    error above the tolerance."""
    from cnnscan.metrics.completeness import COMPLETENESS_TOLERANCE
    from cnnscan.metrics.leaderboard import PASSES

    if isinstance(value, dict):
        return value.get("verdict") not in (None, PASSES)
    return key == "completeness" and isinstance(value, float) and value > COMPLETENESS_TOLERANCE


@functools.cache
def _template() -> jinja2.Template:
    text = resources.files("cnnscan").joinpath("templates/report.html.j2").read_text("utf-8")
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(text)
