"""The `cnnscan` command: a thin shell over the library (no method logic here)."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import sys
import textwrap
import time
import warnings
import webbrowser
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cnnscan import __version__
from cnnscan.choices import (
    CLASS_IMAGE_STEPS,
    CONCEPT_METHODS,
    DEFAULT_IMAGE,
    FILTER_MODES,
    SCALES,
    VIEWS,
)
from cnnscan.errors import CnnscanError

_STARTED = time.perf_counter()  # about when the command started (nothing heavy loads first)

# Before torch loads: OpenMP threads that spin long while they wait for work make every
# forward crawl when other jobs share the cores, and waiting passively costs a quarter on a
# quiet machine; a short spin is as fast as either where it matters (docs/measurements.md).
# A value the user set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

EXAMPLES = {
    "scan": """examples:
  cnnscan scan                                   # bundled cat photo, bundled model
  cnnscan scan photo.jpg --out results/          # your photo
  cnnscan scan photo.jpg --methods gradient,integrated_gradients --top-k 3
  cnnscan scan photo.jpg --full                  # also the slow ones (Score-CAM, perturbation)
  cnnscan scan photo.jpg --model resnet50 --weights resnet50.pth""",
    "explain": """examples:
  cnnscan explain cat.jpg --method integrated_gradients --targets top3
  cnnscan explain cat.jpg --method smoothgrad --targets 285,"tiger cat" \\
      --option base=guided_backprop
  cnnscan explain sample:coffee --method integrated_gradients --option n_steps=auto""",
    "layers": """examples:
  cnnscan layers                                 # the bundled model
  cnnscan layers --model vgg16 --weights none --leaves""",
    "methods": """examples:
  cnnscan methods
  cnnscan methods --family gradient""",
    "filters": """examples:
  cnnscan filters --out filters/                 # first conv layer as RGB tiles
  cnnscan filters --layer _blocks.1._depthwise_conv --out filters/
  cnnscan filters --model vgg16 --layer features.2 --mode mean --out filters/""",
    "features": """examples:
  cnnscan features sample:chelsea --layer _swish@1 --top 32 --out maps/
  cnnscan features cat.jpg --layer _blocks.2 --layer _blocks.8 --scale per-map --out maps/
  cnnscan features cat.jpg --model resnet50 --layer layer3 --out maps/""",
    "concepts": """examples:
  cnnscan concepts                               # the bundled cat: concepts of the last block
  cnnscan concepts photo.jpg --layer _blocks.12 --top 8 --targets top2
  cnnscan concepts photo.jpg --references photos/ --out concepts/
  cnnscan concepts photo.jpg --method gradient_x_activation --no-pictures""",
    "dream": """examples:
  cnnscan dream --class 285                      # what the model thinks an Egyptian cat is
  cnnscan dream --class "tiger cat" --param pixel --steps 200   # Simonyan et al.'s setting
  cnnscan dream --channel _blocks.10._swish@0:5 --steps 256 --seed 1
  cnnscan dream --channel _blocks.10._swish@0:5 --batch 4 --diversity 1
  cnnscan dream --neuron _blocks.6._swish@1:7
  cnnscan dream --deepdream sample:chelsea --layer _blocks.6._swish@1 --octaves 4
  cnnscan dream --invert sample:chelsea --layer _blocks.10._swish@1 --out inverted/""",
    "models": """examples:
  cnnscan models '*vgg*'                         # torchvision, timm and Keras names
  cnnscan scan cat.jpg --model InceptionResNetV2 --weights none
  cnnscan scan cat.jpg --model model.onnx        # or model.keras""",
    "evaluate": """examples:
  cnnscan evaluate                               # default methods on the bundled cat photo
  cnnscan evaluate cat.jpg --methods gradcam,integrated_gradients --box 40,20,300,280
  cnnscan evaluate cat.jpg --mask cat-mask.png --metrics pointing_game,energy_in_box
  cnnscan evaluate cat.jpg --steps 224 --cascade --out eval/""",
    "app": """examples:
  cnnscan app                                    # http://127.0.0.1:8501
  cnnscan app --port 8600 --max-upload-mb 50
  cnnscan app --host 0.0.0.0 --port 0            # any free port, reachable from the network
  cnnscan app --allow-local-files                # the page may load weights files on the server""",
    "batch": """examples:
  cnnscan batch photos/ --methods gradcam,integrated_gradients --out results/
  cnnscan batch 'photos/**/*.jpg' --methods gradcam --targets top3 --resolution input
  cnnscan batch labels.csv --targets label --metrics deletion,insertion,pointing_game
  cnnscan batch photos/ --option integrated_gradients.n_steps=16 --float16
  cnnscan batch photos/ --engine ray --workers 4          # a local Ray
  cnnscan batch photos/ --engine ray --address ray://head:10001 --workers 32
Run the same command again to resume: finished images are skipped.""",
    "audit": """examples:
  cnnscan audit results/                         # a finished (or resumed) batch output
  cnnscan audit results/ --classes horse,339 --method gradcam
  cnnscan audit photos/ --method lrp --out audit/   # runs the batch first (audit/batch)
  cnnscan audit labels.csv --targets label --model resnet50 --out audit/
  cnnscan audit photos/ --engine ray --workers 8 --out audit/   # the batch on Ray""",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnscan",
        description="A CT scan for convolutional image classifiers: what a network learned "
        "and why it predicts what it predicts.",
        epilog="Run `cnnscan COMMAND --help` for examples. Images: a path or sample:NAME "
        "(chelsea, coffee, astronaut, ...).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return sub

    def model_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--model", default=None, help="model name (default: efficientnet_lite0)")
        sub.add_argument(
            "--weights",
            default="imagenet",
            help="imagenet (default), none (random), or a state-dict file (.pt/.pth/.safetensors)",
        )
        sub.add_argument("--labels", default=None, help="file with one class name per line")
        sub.add_argument(
            "--preprocessing",
            default=None,
            metavar="SPEC",
            help="how the model wants its pixels (ONNX/Keras files do not record it): a preset "
            "(imagenet, inception, efficientnet-lite) and/or KEY=VALUE items (size, crop, "
            "resize, interpolation, mean, std), e.g. inception or imagenet,size=299",
        )
        sub.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0")
        sub.add_argument(
            "--trust-pickle",
            action="store_true",
            help="allow loading a pickled full model (runs code from the file)",
        )

    def memory_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--max-memory",
            default=None,
            metavar="SIZE",
            help="working memory a batch may take, e.g. 512MB or 4GB "
            "(default: $CNNSCAN_MEMORY_MB or 2GB)",
        )

    scan = command("scan", "Full report: top-k predictions and every method for each class.")
    scan.add_argument("image", nargs="?", default=DEFAULT_IMAGE, help="image path or sample:NAME")
    model_options(scan)
    memory_option(scan)
    scan.add_argument("--out", default="cnnscan-report", help="output folder")
    scan.add_argument(
        "--top-k",
        type=_positive_int,
        default=None,
        help="classes to explain (default 5; at most the model's classes)",
    )
    scan.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods (default: every method that takes seconds; see --full)",
    )
    scan.add_argument(
        "--full",
        action="store_true",
        help="every registered method, also slow ones (Score-CAM, perturbation), and the full "
        "sanity checks (cascading randomization of every block, random-class check) in the "
        "leaderboard",
    )
    scan.add_argument(
        "--no-leaderboard", action="store_true", help="skip the evaluation leaderboard"
    )
    scan.add_argument(
        "--class-image-steps",
        type=int,
        default=CLASS_IMAGE_STEPS,
        help=f"steps of the synthesized top-1 class image (default {CLASS_IMAGE_STEPS}; 0: skip)",
    )
    scan.add_argument(
        "--all-maps",
        action="store_true",
        help="also write maps/METHOD/ with a PNG and a raw NPY per map and class (~30 MB for "
        "the default scan; maps.npz always holds the top-1 class's raw maps)",
    )
    scan.add_argument("--open", action="store_true", help="open the report in a browser")
    scan.add_argument(
        "--quiet", action="store_true", help="no progress lines and no picture in the terminal"
    )

    explain = command("explain", "One method, one image, chosen targets.")
    explain.add_argument("image", help="image path or sample:NAME")
    explain.add_argument("--method", required=True, help="method name (see `cnnscan methods`)")
    explain.add_argument("--targets", default="top1", help="topK, or comma-separated ids/names")
    explain.add_argument("--layer", default=None, help="layer name for layer methods")
    explain.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option (repeatable), e.g. n_steps=100",
    )
    explain.add_argument(
        "--view",
        default=None,
        choices=VIEWS,
        help="how the PNGs show the map (default: the method's usual view)",
    )
    explain.add_argument("--out", default="cnnscan-explain", help="output folder")
    model_options(explain)
    memory_option(explain)

    layers = command(
        "layers", "Table of layers: name, type, output shape, receptive field, parameters."
    )
    model_options(layers)
    layers.add_argument("--image", default=DEFAULT_IMAGE, help="image used for the shapes")
    layers.add_argument("--leaves", action="store_true", help="only leaf modules")

    methods = command("methods", "List the explanation methods.")
    methods.add_argument("--family", default=None)

    filters = command("filters", "Grid picture of a convolution layer's filters (weights).")
    model_options(filters)
    filters.add_argument("--layer", default=None, help="conv layer (default: the first one)")
    filters.add_argument(
        "--mode",
        default="auto",
        choices=FILTER_MODES,
        help="rgb: colour tiles (3 input channels); channels: a row of grey tiles per filter; "
        "mean: averaged over input channels; auto (default): rgb if possible, else channels",
    )
    filters.add_argument("--max-filters", type=_positive_int, default=64, help="default 64")
    filters.add_argument(
        "--max-channels", type=_positive_int, default=32, help="channels mode (default 32)"
    )
    filters.add_argument("--out", default="cnnscan-filters", help="output folder")

    features = command("features", "Grid picture of a layer's feature maps for an image.")
    features.add_argument("image", help="image path or sample:NAME")
    features.add_argument(
        "--layer",
        action="append",
        required=True,
        help="layer name (repeatable; `cnnscan layers` lists them, name@k picks a call)",
    )
    features.add_argument(
        "--top", type=_positive_int, default=None, help="only the N channels of highest mean"
    )
    features.add_argument("--scale", default="shared", choices=SCALES, help="colour scale")
    features.add_argument("--out", default="cnnscan-features", help="output folder")
    model_options(features)
    concepts = command(
        "concepts",
        "Which channels of a layer carried the prediction (CRP): a page with each concept's "
        "share, conditional heatmap, footprint, synthesized picture and reference patches.",
    )
    concepts.add_argument(
        "image", nargs="?", default=DEFAULT_IMAGE, help="image path or sample:NAME"
    )
    concepts.add_argument(
        "--layer", default=None, help="layer name (default: the last convolutional layer)"
    )
    concepts.add_argument("--top", type=_positive_int, default=6, help="concepts per target")
    concepts.add_argument("--targets", default="top1", help="top1 (default), topK, ids or names")
    concepts.add_argument(
        "--method", default="lrp", choices=CONCEPT_METHODS, help="how relevance flows back"
    )
    concepts.add_argument(
        "--references", default=None, metavar="DIR", help="folder (or glob) of reference images"
    )
    concepts.add_argument(
        "--no-pictures", action="store_true", help="skip the synthesized feature pictures"
    )
    concepts.add_argument("--out", default="cnnscan-concepts", help="output folder")
    model_options(concepts)
    memory_option(concepts)
    dream = command(
        "dream",
        "Synthesize images: activation maximization of a class, channel or neuron, DeepDream "
        "on a photo, or a photo reconstructed from one layer's features.",
    )
    mode = dream.add_mutually_exclusive_group(required=True)
    mode.add_argument("--class", dest="class_id", metavar="CLASS", help="class id or name")
    mode.add_argument("--channel", metavar="LAYER:K", help="channel K of LAYER")
    mode.add_argument("--neuron", metavar="LAYER:K", help="channel K of LAYER at its centre")
    mode.add_argument("--deepdream", metavar="IMAGE", help="dream on this photo (needs --layer)")
    mode.add_argument("--invert", metavar="IMAGE", help="invert this photo (needs --layer)")
    dream.add_argument("--layer", default=None, help="layer for --deepdream / --invert")
    dream.add_argument("--octaves", type=_positive_int, default=4, help="DeepDream octaves")
    dream.add_argument("--steps", type=_positive_int, default=None, help="optimization steps")
    dream.add_argument("--size", type=_positive_int, default=None, help="image size in pixels")
    dream.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    dream.add_argument("--param", choices=("fft", "pixel"), default=None, help="image parameters")
    dream.add_argument("--batch", type=_positive_int, default=1, help="images to optimize")
    dream.add_argument(
        "--diversity", type=float, default=0.0, help="weight of the diversity term (--batch >= 2)"
    )
    dream.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    dream.add_argument("--out", default="cnnscan-dream", help="output folder")
    model_options(dream)
    models = command("models", "List the model names --model accepts.")
    models.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. '*vgg*'")
    evaluate = command(
        "evaluate",
        "Score explanation methods on one image: deletion/insertion AUC, confidence drop, "
        "pointing game, sanity checks; a ranked table plus curves (PNG) and scores (JSON).",
    )
    evaluate.add_argument(
        "image", nargs="?", default=DEFAULT_IMAGE, help="image path or sample:NAME"
    )
    evaluate.add_argument(
        "--methods", default=None, help="comma-separated methods (default: those of a scan)"
    )
    evaluate.add_argument("--target", default="top1", help="topK (K-th class) or a class id/name")
    evaluate.add_argument(
        "--metrics", default=None, help="comma-separated metrics (default: all but max_sensitivity)"
    )
    region = evaluate.add_mutually_exclusive_group()
    region.add_argument("--box", default=None, help="object box x0,y0,x1,y1 in image pixels")
    region.add_argument("--mask", default=None, help="object mask image (the photo's size)")
    evaluate.add_argument(
        "--steps", type=_positive_int, default=50, help="deletion/insertion steps (default 50)"
    )
    evaluate.add_argument(
        "--substrate",
        default=None,
        choices=("zero", "black", "mean", "blur", "noise"),
        help="what removed pixels become (default: RISE's, zero for deletion, blur for insertion)",
    )
    evaluate.add_argument(
        "--reduce",
        default="abs",
        choices=("abs", "signed", "positive"),
        help="how channels reduce to one relevance per pixel (default abs: Σ|a_c|)",
    )
    evaluate.add_argument(
        "--cascade", action="store_true", help="randomize every block, not only the top one"
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    evaluate.add_argument("--out", default="cnnscan-evaluate", help="output folder")
    model_options(evaluate)

    app = command("app", "Start the web app in the browser: a CT scan of your CNN.")
    app.add_argument("--port", type=int, default=8501, help="port (default 8501; 0: any free)")
    app.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    app.add_argument(
        "--allow-local-files",
        action="store_true",
        help="let the page load weights files (state dicts) from this machine's disk",
    )
    app.add_argument(
        "--max-upload-mb", type=_positive_int, default=20, help="upload size limit (default 20)"
    )
    batch = command(
        "batch",
        "Explain (and evaluate) every image of a folder, glob or CSV/Parquet table into "
        "Parquet tables and compressed arrays; resumable, in-process or on Ray.",
    )
    batch.add_argument(
        "input",
        help="a folder (searched recursively), a quoted glob, or a CSV/Parquet table with a "
        "'path' column (optional 'label', 'id' and x0,y0,x1,y1 box columns)",
    )
    batch.add_argument("--methods", default="gradcam", help="comma-separated (default gradcam)")
    batch.add_argument("--out", default="cnnscan-batch", help="output folder")
    batch.add_argument(
        "--targets", default="top1", help="topK, label (the table's labels), or ids/names"
    )
    batch.add_argument("--layer", default=None, help="layer for layer methods (CAMs)")
    batch.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="[METHOD.]KEY=VALUE",
        help="method option (repeatable), e.g. integrated_gradients.n_steps=16",
    )
    batch.add_argument(
        "--resolution",
        choices=("layer", "input"),
        default="layer",
        help="store maps at the method's own resolution (default) or the input's",
    )
    batch.add_argument("--float16", action="store_true", help="store maps as float16")
    batch.add_argument(
        "--metrics", default=None, help="comma-separated, e.g. deletion,insertion,pointing_game"
    )
    batch.add_argument(
        "--top-k",
        type=_positive_int,
        default=None,
        help="predictions kept (default 5; at most the model's classes)",
    )
    batch.add_argument("--engine", choices=("local", "ray"), default="local")
    batch.add_argument("--address", default=None, help="Ray cluster address (--engine ray)")
    batch.add_argument("--batch-size", type=_positive_int, default=8, help="images per forward")
    batch.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="explainers in parallel, one thread each: threads (local) or Ray actors (ray); "
        "default: torch's thread count (the cores); results do not depend on it",
    )
    batch.add_argument(
        "--part-size", type=_positive_int, default=64, help="images per output file (64)"
    )
    batch.add_argument("--path-column", default="path", help="table column with image paths")
    batch.add_argument("--label-column", default="label", help="table column with labels")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")
    model_options(batch)

    audit = command(
        "audit",
        "Find a model's strategies per class (SpRAy): cluster the maps of a batch output, "
        "flag clusters whose relevance sits at the border or in a small fixed region, and "
        "write audit.html.",
    )
    audit.add_argument(
        "input",
        help="a batch output folder, or images as `cnnscan batch` takes them (explained first)",
    )
    audit.add_argument("--method", default="lrp", help="the maps to cluster (default lrp)")
    audit.add_argument("--classes", default=None, help="comma-separated ids or names (default all)")
    audit.add_argument(
        "--out", default=None, help="output folder (default: the batch output, or cnnscan-audit)"
    )
    audit.add_argument("--targets", default="top1", help="when explaining: top1 or label")
    audit.add_argument(
        "--size", type=_positive_int, default=32, help="maps are shrunk to SIZE×SIZE (32)"
    )
    audit.add_argument(
        "--max-clusters", type=_positive_int, default=10, help="at most this many per class (10)"
    )
    audit.add_argument("--seed", type=int, default=0, help="k-means and t-SNE seed (0)")
    audit.add_argument(
        "--engine", choices=("local", "ray"), default="local", help="when explaining: as batch"
    )
    audit.add_argument("--address", default=None, help="Ray cluster address (--engine ray)")
    audit.add_argument("--workers", type=_positive_int, default=None, help="as batch")
    audit.add_argument("--quiet", action="store_true", help="no progress bar")
    model_options(audit)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _load(args: argparse.Namespace):
    from cnnscan.models import load_model

    weights = None if str(args.weights).lower() == "none" else args.weights
    return load_model(
        args.model,
        weights=weights,
        labels=args.labels,
        preprocessing=args.preprocessing,
        device=args.device,
        trust_pickle=args.trust_pickle,
    )


def _names(text: str | None, flag: str) -> list[str] | None:
    """The comma-separated names of `flag` (None if not given); a flag given without a name
    (e.g. --methods ",") is an error, not the defaults."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise CnnscanError(f"{flag} {text!r} names nothing; give comma-separated names")
    return names


def _parse_value(text: str) -> Any:
    """Option values: JSON where it parses (numbers, booleans, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _cmd_scan(args: argparse.Namespace) -> int:
    from cnnscan.images import load_image
    from cnnscan.methods import get_methods
    from cnnscan.report import default_methods, run_scan, write_report

    names = _names(args.methods, "--methods")
    methods = [m.name for m in get_methods(names)] if names else default_methods(args.full)
    picture = load_image(args.image)  # bad images fail before the model loads
    model = _load(args)
    name = args.image if args.image.startswith("sample:") else Path(args.image).name
    result = run_scan(
        model,
        picture,
        methods=methods,
        top_k=args.top_k,
        image_name=name,
        observer=_ScanPrinter(Path(args.out), quiet=args.quiet, model=model),
        class_image_steps=args.class_image_steps,
        evaluate="none" if args.no_leaderboard else "full" if args.full else "default",
        max_memory=args.max_memory,
    )
    path = write_report(result, args.out, all_maps=args.all_maps)
    print(f"scanned in {time.perf_counter() - _STARTED:.1f} s; report: {path.resolve()}")
    if args.open:
        webbrowser.open(path.resolve().as_uri())
    return 0


class _ScanPrinter:
    """The scan as it goes: the top-k at once, the first map (a PNG, and a picture in a
    colour terminal), then one progress line per stage with its ETA on stderr."""

    def __init__(self, out: Path, quiet: bool, model: Any):
        self.out, self.quiet, self.model = out, quiet, model

    def predictions(self, rows: list[dict[str, Any]]) -> None:
        print(f"{self.model.name}; preprocessing: {self.model.preprocessing.describe(origin=True)}")
        for p in rows:
            print(f"{p['rank']}. {p['class_id']:4d} {p['label']:<30} {p['probability']:.4f}")
        sys.stdout.flush()

    def first_map(self, attr: Any, view: Any) -> None:
        from cnnscan import render
        from cnnscan.display import map_picture

        picture = map_picture(attr, 0, 0, view)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"{attr.method}-top1.png"
        path.write_bytes(render.png_bytes(picture))
        print(
            f"{attr.method} of {attr.label(0, 0)}: {path} ({time.perf_counter() - _STARTED:.1f} s)"
        )
        if not self.quiet and sys.stdout.isatty():
            print(render.terminal_picture(picture))
        sys.stdout.flush()

    @contextlib.contextmanager
    def stage(self, name: str, total: int, unit: str):
        from tqdm import tqdm

        with tqdm(
            total=total, desc=name, unit=unit, file=sys.stderr, disable=self.quiet, leave=True
        ) as bar:

            def advance(done: int) -> None:
                bar.update(done - bar.n)

            yield advance
            if bar.total and bar.n < bar.total:  # an estimate: close the line at 100 %
                bar.total = bar.n


def _cmd_explain(args: argparse.Namespace) -> int:
    from cnnscan.api import explain
    from cnnscan.methods import get_method
    from cnnscan.targets import parse_targets

    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise CnnscanError(f"--option expects KEY=VALUE, got {item!r}")
        options[key.strip()] = _parse_value(value)
    info = get_method(args.method)
    attr = explain(
        _load(args),
        args.image,
        info.name,
        targets=parse_targets(args.targets),
        layer=args.layer,
        max_memory=args.max_memory,
        **options,
    )
    written = attr.save(args.out, kind=args.view or info.view, overlay=True)
    for t in range(attr.targets.shape[1]):
        print(f"{info.name} for {attr.label(0, t)}")
    for key, value in attr.summary()["extras"].items():
        print(f"  {key}: {value}")
    print(
        f"wrote {len(written)} files to {Path(args.out).resolve()}: per target the raw map "
        "(.npy), its picture (.png) and the map over the photo (_overlay.png)"
    )
    return 0


def _cmd_layers(args: argparse.Namespace) -> int:
    from cnnscan.images import load_image
    from cnnscan.receptive import layer_geometry

    picture = load_image(args.image)
    model = _load(args)
    table = layer_geometry(model, picture)
    rows = [row for row, _ in table if row.is_leaf or not args.leaves]
    fields = {row.name: field for row, field in table}
    width = max(len(row.name) for row in rows) + 2
    print(
        f"{'layer':<{width}}{'type':<28}{'output shape':<20}{'RF':>9}{'jump':>7}{'parameters':>12}"
    )
    for row in rows:
        shape = "×".join(map(str, row.output_shape)) if row.output_shape else "-"
        field = fields[row.name]
        print(
            f"{row.name:<{width}}{row.type:<28}{shape:<20}{field.describe():>9}"
            f"{field.describe_jump():>7}{row.parameters:>12,}"
        )
    unknown = {field.note for field in fields.values() if not field.known}
    if unknown:
        print(f"RF ?: {'; '.join(sorted(unknown))}")
    print(f"{model.name}: {sum(p.numel() for p in model.module.parameters()):,} parameters")
    return 0


def _cmd_filters(args: argparse.Namespace) -> int:
    import numpy as np

    from cnnscan.learned import conv_layers, filters
    from cnnscan.render import filter_grid, png_bytes

    model = _load(args)
    weights = filters(model, args.layer)
    layer = args.layer or conv_layers(model)[0]
    picture = filter_grid(
        weights, args.mode, max_filters=args.max_filters, max_channels=args.max_channels
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"filters_{_file_name(layer)}"
    (out / f"{stem}.png").write_bytes(png_bytes(picture))
    np.save(out / f"{stem}.npy", weights.cpu().numpy())
    shown = min(len(weights), args.max_filters)
    kernel = "×".join(map(str, weights.shape[1:]))
    print(f"{layer}: {len(weights)} filters of {kernel} (in×h×w), {shown} drawn")
    print(f"wrote {(out / f'{stem}.png').resolve()} and the exact weights ({stem}.npy)")
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    import numpy as np

    from cnnscan.images import load_image
    from cnnscan.learned import feature_maps, top_channels
    from cnnscan.render import feature_grid, png_bytes

    picture = load_image(args.image)  # bad images fail before the model loads
    model = _load(args)
    maps = feature_maps(model, picture, args.layer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for layer, tensor in maps.items():
        if tensor.ndim != 4:
            raise CnnscanError(
                f"layer {layer} outputs shape {tuple(tensor.shape)}, not feature maps "
                "(N, C, H, W); pick a convolutional layer (see `cnnscan layers`)"
            )
        channels = top_channels(tensor[0], args.top)
        stem = f"features_{_file_name(layer)}"
        grid = feature_grid(tensor[0], channels, scale=args.scale)
        (out / f"{stem}.png").write_bytes(png_bytes(grid))
        np.save(out / f"{stem}.npy", tensor[0].cpu().numpy())
        means = tensor[0].flatten(1).mean(dim=1)
        strongest = ", ".join(f"{int(c)} ({float(means[c]):.3g})" for c in channels[:5])
        print(f"{layer}: {'×'.join(map(str, tensor.shape[1:]))}; strongest channels {strongest}")
    print(f"wrote {len(maps)} grid(s) and raw maps (.npy) to {out.resolve()}")
    return 0


def _file_name(layer: str) -> str:
    return layer.replace("@", "_call").replace("/", "_")


def _cmd_concepts(args: argparse.Namespace) -> int:
    from cnnscan.concept import concepts
    from cnnscan.images import load_image
    from cnnscan.targets import parse_targets

    picture = load_image(args.image)  # bad images fail before the model loads
    model = _load(args)
    found = concepts(
        model,
        picture,
        parse_targets(args.targets),
        layer=args.layer,
        top=args.top,
        method=args.method,
        pictures=not args.no_pictures,
        references=args.references,
        device=args.device,
        max_memory=args.max_memory,
    )
    page, _ = found.save(args.out)
    print(f"{found.model} at {found.layer} ({'×'.join(map(str, found.shape))}), {found.method}")
    for target in found.targets:
        listing = ", ".join(f"{c.channel} ({100 * c.share:+.1f} %)" for c in target.concepts)
        print(f"{target.label}: {listing}")
        if target.ablation is not None:
            check = target.ablation
            print(
                f"  zeroing the top {len(check.channels)} lowers the logit by {check.top:.3f}; "
                f"random channels by {check.random_mean:.3f} on average"
            )
    print(f"wrote {page.resolve()} and concepts.json")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from cnnscan.methods import list_methods

    families = sorted({info.family for info in list_methods()})
    if args.family is not None and args.family not in families:
        raise CnnscanError(f"unknown family {args.family!r}; families: {', '.join(families)}")
    rows = [
        (
            info.name,
            info.family,
            (info.cost or "not stated") + ("" if info.in_default_scan else " (slow: scan --full)"),
            info.description,
        )
        for info in list_methods(args.family)
    ]
    header = ("method", "family", "cost (forwards, backwards)", "description")
    print("\n".join(_table(header, rows, wrap=(2, 3))))
    return 0


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], wrap: Sequence[int]) -> list[str]:
    """Lines of an aligned table as wide as the terminal (100 columns when it is not one):
    the columns in `wrap` are word-wrapped into what the others leave (the last one gets
    the most), the others are as wide as their longest cell."""
    width = max(shutil.get_terminal_size((100, 24)).columns, 60)
    cells = [list(header), *[list(row) for row in rows]]
    widths = [max(len(row[c]) for row in cells) for c in range(len(header))]
    fixed = sum(w + 2 for c, w in enumerate(widths) if c not in wrap)
    room = width - fixed - 2 * (len(wrap) - 1)
    *first, last = wrap
    for column in first:  # a share of the room, never more than the column needs
        widths[column] = min(widths[column], max(room // (len(wrap) + 1), len(header[column])))
        room -= widths[column]
    widths[last] = max(room, len(header[last]))
    lines = []
    for row in cells:
        # no break after a hyphen: a wrapped cell reads back joined by spaces ("class-agnostic")
        parts = [
            textwrap.wrap(text, widths[c], break_on_hyphens=False) or [""]
            for c, text in enumerate(row)
        ]
        for pieces in itertools.zip_longest(*parts, fillvalue=""):
            line = "  ".join(f"{p:<{widths[c]}}" for c, p in enumerate(pieces))
            lines.append(line.rstrip())
    return lines


def _cmd_dream(args: argparse.Namespace) -> int:
    from cnnscan import synthesis

    options = {
        key: value
        for key, value in {"steps": args.steps, "size": args.size, "lr": args.lr}.items()
        if value is not None
    }
    if args.param is not None:
        options["param"] = args.param
    photo = args.deepdream or args.invert
    if photo is not None and args.layer is None:
        raise CnnscanError(
            f"--{'deepdream' if args.deepdream else 'invert'} needs --layer LAYER "
            "(`cnnscan layers` lists them), e.g. --layer _blocks.6._swish@1"
        )
    model = _load(args)
    common = {"seed": args.seed, "progress": True}
    if args.class_id is not None:
        target = int(args.class_id) if args.class_id.lstrip("-").isdigit() else args.class_id
        result = synthesis.class_image(model, target, **common, **options)
        stem = f"class-{result.settings['class_id']}"
    elif args.channel or args.neuron:
        spec = args.channel or args.neuron
        layer, sep, k = spec.rpartition(":")
        if not sep or not layer or not k.isdigit():
            raise CnnscanError(f"expected LAYER:K (e.g. _blocks.10._swish@0:5), got {spec!r}")
        objective = (synthesis.channel if args.channel else synthesis.neuron)(layer, int(k))
        if args.diversity:
            objective = objective + args.diversity * synthesis.diversity(layer)
        result = synthesis.synthesize(model, objective, batch=args.batch, **common, **options)
        stem = f"{'channel' if args.channel else 'neuron'}-{layer}-{k}"
    elif args.deepdream:
        if "lr" in options or "param" in options:
            raise CnnscanError("--deepdream takes gradient steps on the photo: no --lr / --param")
        options["steps"] = options.get("steps", 10)
        result = synthesis.deepdream(
            model, args.deepdream, args.layer, octaves=args.octaves, **common, **options
        )
        stem = f"deepdream-{args.layer}"
    else:
        if "size" in options:
            raise CnnscanError("--invert works at the model's input size: no --size")
        result = synthesis.invert(model, args.invert, args.layer, **common, **options)
        stem = f"invert-{args.layer}"
    written = result.save(args.out, stem)
    print(
        f"{result.objective}: {result.initial:.4g} -> {result.final:.4g} in "
        f"{len(result.history)} steps ({result.seconds:.1f} s)"
    )
    print(f"wrote {len(written)} files to {Path(args.out).resolve()}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from cnnscan.models.zoo import list_models

    names = list_models(args.pattern)
    if not names:
        raise CnnscanError(f"no model name matches {args.pattern!r}; try '*{args.pattern}*'")
    print("\n".join(names))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cnnscan.images import load_image
    from cnnscan.methods import get_methods
    from cnnscan.metrics import get_metric
    from cnnscan.metrics.localization import region
    from cnnscan.metrics.outputs import evaluate_methods, print_table, write_evaluation
    from cnnscan.report import default_methods
    from cnnscan.targets import parse_targets

    names = _names(args.methods, "--methods")
    methods = [m.name for m in get_methods(names)] if names else default_methods()
    metrics = _names(args.metrics, "--metrics")
    chosen = [get_metric(name) for name in metrics or ()]  # unknown names fail here
    needs = [info.name for info in chosen if info.needs_region]
    if needs and args.box is None and args.mask is None:
        raise CnnscanError(f"{', '.join(needs)} need --box x0,y0,x1,y1 or --mask FILE")
    picture = load_image(args.image)  # bad images fail before the model loads
    model = _load(args)
    if args.box is not None or args.mask is not None:  # bad regions fail before any work
        prep = model.preprocessing
        region(prep.size, box=args.box, mask=args.mask, picture=picture, preprocessing=prep)
    target = parse_targets(args.target)
    if isinstance(target, list) and len(target) > 1:
        raise CnnscanError(f"--target takes one class (or topK), got {args.target!r}")
    result = evaluate_methods(
        model,
        picture,
        methods,
        target=target[0] if isinstance(target, list) else target,
        metrics=metrics,
        steps=args.steps,
        substrate=args.substrate,
        reduce=args.reduce,
        box=args.box,
        mask=args.mask,
        cascade=args.cascade,
        seed=args.seed,
    )
    print_table(result)
    path = write_evaluation(result, args.out)
    print(f"wrote scores and curves to {path.resolve()}")
    return 0


def _cmd_app(args: argparse.Namespace) -> int:
    from cnnscan.app.launch import serve

    return serve(
        args.port,
        args.host,
        allow_local_files=args.allow_local_files,
        max_upload_mb=args.max_upload_mb,
        announce=lambda line: print(line, flush=True),
    )


def _cmd_batch(args: argparse.Namespace) -> int:
    from cnnscan.batch import run
    from cnnscan.targets import parse_targets

    methods = _names(args.methods, "--methods")
    options: dict[str, dict[str, Any]] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        method, dot, name = key.strip().rpartition(".")
        if not sep or (not dot and len(methods) != 1):
            raise CnnscanError(
                f"--option expects METHOD.KEY=VALUE (KEY=VALUE with one method), got {item!r}"
            )
        options.setdefault(method or methods[0], {})[name] = _parse_value(value)
    targets = args.targets if args.targets.strip() == "label" else parse_targets(args.targets)
    metrics = _names(args.metrics, "--metrics") or ()
    results = run(
        args.input,
        methods,
        args.out,
        model=_load(args),
        targets=targets,
        layer=args.layer,
        options=options,
        resolution=args.resolution,
        dtype="float16" if args.float16 else "float32",
        metrics=metrics,
        top_k=args.top_k,
        engine=args.engine,
        address=args.address,
        batch_size=args.batch_size,
        workers=args.workers,
        part_size=args.part_size,
        path_column=args.path_column,
        label_column=args.label_column,
        progress=not args.quiet,
    )
    summary = results.summary()
    print(
        f"{summary['images']} images: {summary['explained']} explained, "
        f"{summary['errors']} errors; {summary['rows']} rows"
    )
    for method, numbers in summary["methods"].items():
        means = ", ".join(
            f"{key.removeprefix('mean_')} {value:.4f}"
            for key, value in numbers.items()
            if key.startswith("mean_") and value is not None
        )
        print(f"  {method}: {means}")
    if summary["top1_accuracy"] is not None:
        print(f"  top-1 accuracy {summary['top1_accuracy']:.4f} ({summary['labelled']} labelled)")
    print(f"results in {results.out.resolve()} (summary.html)")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from cnnscan.spray import audit

    finished = (Path(args.input) / "run.json").exists()
    out = args.out or (args.input if finished else "cnnscan-audit")
    model = _load(args) if args.model is not None or not finished else None
    extra = {} if finished else {"targets": args.targets, "progress": not args.quiet}
    if not finished:
        extra |= {"engine": args.engine, "address": args.address, "workers": args.workers}
    found = audit(
        args.input,
        method=args.method,
        classes=_names(args.classes, "--classes"),
        out=out,
        model=model,
        size=args.size,
        max_clusters=args.max_clusters,
        seed=args.seed,
        **extra,
    )
    clusters = found.clusters.to_pylist()
    for info in found.classes.to_pylist():
        mine = [c for c in clusters if c["class_id"] == info["class_id"]]
        flagged = [c for c in mine if c["suspicious"]]
        name = f" ({info['class_name']})" if info["class_name"] else ""
        print(
            f"class {info['class_id']}{name}: {info['maps']} maps, {info['clusters']} clusters, "
            f"{len(flagged)} suspicious"
        )
        for c in flagged:
            print(f"  cluster {c['cluster']} ({c['size']} maps): {c['reason']}")
    print(f"audit in {(Path(out) / 'audit.html').resolve()}")
    return 0


_COMMANDS = {
    "scan": _cmd_scan,
    "explain": _cmd_explain,
    "layers": _cmd_layers,
    "methods": _cmd_methods,
    "filters": _cmd_filters,
    "features": _cmd_features,
    "concepts": _cmd_concepts,
    "dream": _cmd_dream,
    "models": _cmd_models,
    "evaluate": _cmd_evaluate,
    "app": _cmd_app,
    "batch": _cmd_batch,
    "audit": _cmd_audit,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns the exit code (0 ok, 1 error, 2 usage error)."""
    args = _parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            if not args.debug:  # library deprecation chatter is not the user's business
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
            return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("cnnscan: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        kind = "error" if isinstance(e, CnnscanError) else f"error ({type(e).__name__})"
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"cnnscan: {kind}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
