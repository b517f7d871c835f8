"""The gallery page, computed when the site is built: every registered method on two sample
photos for the model's top-1 class, then filters, feature maps and synthesized images.

Methods come from the registry (`cnnscan.list_methods()`), so a method registered later
appears without edits. Step and sample counts are kept small so the build stays fast; the
options used are printed under each row. Slow methods (`in_default_scan=False`) run with
the cheaper settings of `Settings.slow`.

`CNNSCAN_DOCS_GALLERY=fast` (the docs test, quick previews with `mkdocs serve`) still runs
every method, on one photo with minimal counts, slow layer methods at an early layer; the
pages say so. The default, `full`, is the published build.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import cnnscan
from cnnscan import render
from cnnscan.attribution import Attribution
from cnnscan.display import map_picture
from cnnscan.learned import depth_layers
from cnnscan.methods import MethodInfo, run_method
from cnnscan.report import learned_pictures
from cnnscan.scan import Scan, make_scan

TILE_PX = 192
MODE_VARIABLE = "CNNSCAN_DOCS_GALLERY"


@dataclass(frozen=True)
class Settings:
    """How much the gallery and the trust page compute."""

    mode: str
    photos: tuple[str, ...]
    # Count options lowered for every method that has them (the defaults take longer, not
    # different pictures: IG's completeness error is printed where it matters).
    quick: dict[str, Any]
    # Slow methods: fewer forwards still (masks, samples, windows).
    slow: dict[str, Any]
    synthesis_steps: int
    synthesis_px: int
    trust_steps: int  # deletion/insertion steps (the scan's leaderboard uses 20)
    early_slow_layers: bool = False  # slow layer methods at an early (narrow) layer


MODES = {
    "full": Settings(
        "full",
        ("chelsea", "coffee"),
        quick={"n_steps": 16, "n_samples": 8},
        slow={"n_masks": 256, "n_samples": 64, "window": 32, "stride": 16, "max_iter": 100},
        synthesis_steps=32,
        synthesis_px=128,
        trust_steps=10,
    ),
    "fast": Settings(
        "fast",
        ("chelsea",),
        quick={"n_steps": 4, "n_samples": 2},
        slow={"n_masks": 32, "n_samples": 64, "window": 56, "stride": 56, "max_iter": 8},
        synthesis_steps=2,
        synthesis_px=64,
        trust_steps=4,
        early_slow_layers=True,
    ),
}


def settings() -> Settings:
    """The settings chosen by `$CNNSCAN_DOCS_GALLERY` (default `full`)."""
    mode = os.environ.get(MODE_VARIABLE, "full").strip().lower() or "full"
    if mode not in MODES:
        raise ValueError(f"{MODE_VARIABLE}={mode!r}: use one of {', '.join(MODES)}")
    return MODES[mode]


@dataclass
class Shot:
    """One method on one photo: its attribution, time and options."""

    attr: Attribution
    seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Photo:
    name: str
    picture: Any
    scan: Scan
    class_id: int
    label: str
    probability: float


@dataclass
class Run:
    """Everything computed for the gallery and the trust page."""

    settings: Settings
    model: cnnscan.Model
    photos: list[Photo]
    methods: list[MethodInfo]
    shots: dict[str, dict[str, Shot]]
    seconds: dict[str, float] = field(default_factory=dict)
    boards: dict[str, list[dict[str, Any]]] | None = None  # the trust page's leaderboards
    synthesized: dict[str, np.ndarray] = field(default_factory=dict)  # key -> uint8 image

    def attributions(self, photo: str, slow: bool) -> dict[str, Attribution]:
        """The photo's maps of the slow (`slow=True`) or of the default-scan methods."""
        chosen = {}
        for info in self.methods:
            shot = self.shots[info.name][photo]
            if info.in_default_scan != slow:
                chosen[info.name] = shot.attr
        return chosen

    def options(self, slow: bool) -> dict[str, dict[str, Any]]:
        """Gallery options per method (for metrics that re-run methods)."""
        first = self.photos[0].scan
        return {
            info.name: _options(self.settings, info, first)
            for info in self.methods
            if info.in_default_scan != slow
        }


def _options(chosen_settings: Settings, info: MethodInfo, scan: Scan) -> dict[str, Any]:
    """The gallery's options for a method (counts lowered, never raised: SS-CAM's 35 noise
    samples per channel are not LIME's 1000 coalitions)."""
    takes = info.options()
    chosen = {key: value for key, value in chosen_settings.quick.items() if key in takes}
    if not info.in_default_scan:
        chosen.update({key: value for key, value in chosen_settings.slow.items() if key in takes})
        if chosen_settings.early_slow_layers and info.space == "layer" and "layer" in takes:
            chosen["layer"] = depth_layers(scan.layer_table())[0]
    return {
        key: min(value, takes[key]) if _is_count(takes[key]) and _is_count(value) else value
        for key, value in chosen.items()
    }


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def compute(log: Any = print, chosen: Settings | None = None) -> Run:
    """Run every registered method on the photos (one shared forward per photo)."""
    began = time.perf_counter()
    chosen = chosen or settings()
    model = cnnscan.load_model()
    methods = cnnscan.list_methods()
    photos = []
    for name in chosen.photos:
        picture = cnnscan.load_image(f"sample:{name}")
        scan = make_scan(model, model.preprocessing(picture), methods)
        top = scan.predictions(1)[0][0]
        photos.append(Photo(name, picture, scan, top["class_id"], top["label"], top["probability"]))
    shots: dict[str, dict[str, Shot]] = {}
    for info in methods:
        shots[info.name] = {}
        for photo in photos:
            options = _options(chosen, info, photo.scan)
            start = time.perf_counter()
            attr = run_method(photo.scan, info, [photo.class_id], options=options)
            shots[info.name][photo.name] = Shot(attr, time.perf_counter() - start, options)
        log(f"gallery: {info.name} {sum(s.seconds for s in shots[info.name].values()):.1f} s")
    run = Run(chosen, model, photos, methods, shots)
    run.seconds["methods"] = time.perf_counter() - began
    return run


# One computation per process and mode: `mkdocs serve` rebuilds after an edit of the pages,
# and the docs test's second build, reuse it (the code they run cannot change in between).
_RUNS: dict[str, Run] = {}


def cached(log: Any = print) -> Run:
    """`compute` with the settings of `$CNNSCAN_DOCS_GALLERY`, once per process."""
    chosen = settings()
    if chosen.mode not in _RUNS:
        _RUNS[chosen.mode] = compute(log, chosen)
    return _RUNS[chosen.mode]


def _fit(rgb: np.ndarray) -> np.ndarray:
    return render.enlarge(rgb[None], TILE_PX)[0]


def table_cell(text: str) -> str:
    """`text` safe inside a Markdown table cell (a literal | would end the cell)."""
    return text.replace("|", "&#124;")


def _options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"`{key}={value!r}`" for key, value in options.items())


def method_section(run: Run, pages: set[str]) -> tuple[list[str], dict[str, bytes]]:
    """Markdown lines (one table per family) and the PNG files of the maps."""
    files: dict[str, bytes] = {}
    lines: list[str] = []
    head = " | ".join(f"{p.name}: {p.class_id} {p.label} ({p.probability:.2f})" for p in run.photos)
    family = None
    for info in run.methods:
        if info.family != family:
            family = info.family
            page = f"methods/{family}.md"
            title = f"[{family}]({page})" if page in pages else family
            lines += ["", f"### The {title} family", "", f"| method | {head} | time |"]
            lines.append("|---" * (len(run.photos) + 2) + "|")
        cells, seconds, notes = [], 0.0, []
        for photo in run.photos:
            shot = run.shots[info.name][photo.name]
            view = np.asarray(photo.scan.model.view(photo.picture))
            path = f"gallery/{info.name}-{photo.name}.png"
            files[path] = render.png_bytes(_fit(map_picture(shot.attr, 0, 0, view)))
            cells.append(f"![{info.name} on {photo.name}]({path})")
            seconds += shot.seconds
            relative = shot.attr.extras.get("completeness_error_relative")
            if relative is not None:
                notes.append(f"{photo.name} {float(relative.flatten()[0]):.1%}")
        options = run.shots[info.name][run.photos[0].name].options
        described = f"`{info.name}`<br/>{table_cell(info.description)}"
        if options:
            described += f"<br/>options: {_options_text(options)}"
        if notes:
            described += f"<br/>completeness error: {', '.join(notes)}"
        lines.append(f"| {described} | {' | '.join(cells)} | {seconds:.2f} s |")
    return lines, files


def learned_section(run: Run) -> tuple[list[str], dict[str, bytes]]:
    """Filters of the first convolution, feature maps at three depths per photo, one unit."""
    began = time.perf_counter()
    files: dict[str, bytes] = {}
    model = run.model
    filters = cnnscan.show_filters(model, tile_px=24)
    files["gallery/filters.png"] = filters.png()
    lines = [
        "",
        "## What the network learned",
        "",
        f"**Filters** of the first convolution ({filters.title}; `cnnscan.show_filters(model)`, "
        "`cnnscan filters`), min-max scaled per filter:",
        "",
        "![filters of the first convolution](gallery/filters.png)",
        "",
        "**Feature maps**: the 16 strongest channels (by mean activation) of three layers at "
        "increasing depth, from the photo's one forward "
        "(`cnnscan.show_feature_maps(model, image, layer)`, `cnnscan features`):",
    ]
    for photo in run.photos:
        learned = learned_pictures(photo.scan, photo.scan.layer_table())
        lines += ["", f"| {photo.name} layer | shape | strongest channels |", "|---|---|---|"]
        for layer, shape, picture in learned.feature_maps:
            path = f"gallery/features-{photo.name}-{layer.replace('@', '_call')}.png"
            files[path] = render.png_bytes(picture)
            size = "×".join(map(str, shape))
            lines.append(f"| `{layer}` | {size} | ![{layer} on {photo.name}]({path}) |")
    depth = depth_layers(run.photos[0].scan.layer_table())
    layer = depth[len(depth) // 2]
    photo = run.photos[0]
    maps = photo.scan.activations(layer).detach()[0]
    channel = int(cnnscan.top_channels(maps, 1)[0])
    unit = cnnscan.explain(model, photo.picture, "deconvnet", unit=(layer, channel))
    files["gallery/unit-deconvnet.png"] = render.png_bytes(_fit(unit.image(0, 0, "colour")))
    lines += [
        "",
        f"**One unit**: the DeconvNet reconstruction of channel {channel} of `{layer}` (the "
        f"strongest on {photo.name}), "
        f'`cnnscan.explain(model, image, "deconvnet", unit=("{layer}", {channel}))`:',
        "",
        f"![deconvnet reconstruction of {layer} channel {channel}](gallery/unit-deconvnet.png)",
    ]
    run.seconds["learned"] = time.perf_counter() - began
    return lines, files


def synthesis_section(run: Run) -> tuple[list[str], dict[str, bytes]]:
    """Class images of the photos' top-1 classes, a channel, DeepDream and an inversion."""
    model, photo = run.model, run.photos[0]
    depth = depth_layers(photo.scan.layer_table())
    deep, middle = depth[-1], depth[len(depth) // 2]
    steps, size = run.settings.synthesis_steps, run.settings.synthesis_px
    dream = min(5, steps)
    jobs = [
        (
            f"class-{p.class_id}",
            f"class image of {p.class_id} {p.label}",
            f"cnnscan.class_image(model, {p.class_id}, steps={steps}, size={size})",
            lambda p=p: cnnscan.class_image(model, p.class_id, steps=steps, size=size),
        )
        for p in run.photos
    ]
    jobs += [
        (
            "channel",
            f"channel 5 of {middle}",
            f'cnnscan.synthesize(model, "{middle}:5", steps={steps}, size={size})',
            lambda: cnnscan.synthesize(
                model, f"{middle}:5", steps=steps, size=size, progress=False
            ),
        ),
        (
            "deepdream",
            f"DeepDream of {photo.name} at {middle}",
            f'cnnscan.deepdream(model, "sample:{photo.name}", "{middle}", '
            f"octaves=2, steps={dream})",
            lambda: cnnscan.deepdream(
                model, photo.picture, middle, octaves=2, steps=dream, progress=False
            ),
        ),
        (
            "invert",
            f"{photo.name} reconstructed from {deep}",
            f'cnnscan.invert(model, "sample:{photo.name}", "{deep}", steps={steps})',
            lambda: cnnscan.invert(model, photo.picture, deep, steps=steps, progress=False),
        ),
    ]
    files: dict[str, bytes] = {}
    lines = [
        "",
        "## Synthesized images",
        "",
        f"Optimized for {steps} steps (the library's defaults run longer and look cleaner); "
        "see [Synthesis](synthesis.md).",
        "",
        "| picture | what | call | time |",
        "|---|---|---|---|",
    ]
    for stem, what, call, job in jobs:
        key = f"synthesis: {stem}"
        if key not in run.synthesized:  # computed once per run (see `cached`)
            began = time.perf_counter()
            run.synthesized[key] = job().image
            run.seconds[key] = time.perf_counter() - began
        seconds = run.seconds[key]
        path = f"gallery/synthesis-{stem}.png"
        files[path] = render.png_bytes(run.synthesized[key])
        lines.append(f"| ![{what}]({path}) | {what} | `{call}` | {seconds:.1f} s |")
    return lines, files


def preview_warning(chosen: Settings) -> list[str]:
    return [
        f'!!! warning "A {chosen.mode} preview build"',
        f"    Built with `{MODE_VARIABLE}={chosen.mode}`: minimal counts and steps, so the "
        "pictures and numbers are not representative. The published site is built without it.",
        "",
    ]


def files(run: Run, pages: set[str]) -> dict[str, str | bytes]:
    """`gallery.md` and its pictures; `pages` are the site's pages (for family links)."""
    methods, pictures = method_section(run, pages)
    learned, learned_pictures_ = learned_section(run)
    synthesized, synthesized_pictures = synthesis_section(run)
    slow = [info.name for info in run.methods if not info.in_default_scan]
    total = sum(v for k, v in run.seconds.items() if not k.startswith("trust"))
    chosen = run.settings
    photos = " and ".join(p.name for p in run.photos)
    intro = [
        "# Gallery",
        "",
        *(preview_warning(chosen) if chosen.mode != "full" else []),
        f"Every registered method ({len(run.methods)}) on the sample photos {photos} for the "
        "model's top-1 class, drawn the way `cnnscan scan`'s report draws them: layer maps as "
        "heat maps over the photo, input-space maps in the method's own view. The pictures are "
        "computed by `tools/docs/gallery.py` each time this site is built (bundled "
        "EfficientNet-Lite0 with ImageNet weights, CPU), so they show what the code does "
        f"today; building them took {total:.0f} s, and the time column is that build's.",
        "",
        f"Counts are lowered to keep the build fast ({_options_text(chosen.quick)} where a "
        "method has them). "
        + (
            f"Slow methods ({', '.join(f'`{n}`' for n in slow)}) run "
            f"with cheaper settings ({_options_text(chosen.slow)} where they apply): their "
            "maps are coarser or noisier than with the defaults. "
            if slow
            else ""
        )
        + "Each row lists the options used. The same call for any method: "
        '`cnnscan.explain(model, image, "NAME", targets="top1")`.',
        "",
        "## Explanations of the top-1 class",
    ]
    page = "\n".join([*intro, *methods, *learned, *synthesized]) + "\n"
    return {"gallery.md": page, **pictures, **learned_pictures_, **synthesized_pictures}
