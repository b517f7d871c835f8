"""The default scan: `cnnscan scan` vs the same report content from the peer libraries.

    NO_SANDBOX_OMP=1 python benchmarks/bench_scan.py [--image sample:chelsea] [--repeat 3]
    python benchmarks/bench_scan.py --skip-peers    # ours only (the peers take minutes)

Ours: the real command `cnnscan scan IMAGE --out TMP --quiet`, as a subprocess so that its
start-up counts, `--repeat` times: wall time from process start to the report written and to
the first map (Grad-CAM of the top-1) printed, peak resident memory, the stages of the fastest
run (its timings.json); and `cnnscan --help`. (NO_SANDBOX_OMP=1: this sandbox otherwise forces
an OpenMP wait policy on every Python process; the command gets it set either way.)
Peers, in this process on the default model, for every method of the default scan (read
from the registry, `cnnscan.report.default_methods`; a method with no peer equivalent is
printed and left out of the peers' total), each as its docs show (one call per method and
target, top-5; the scan's sample counts and steps from `cnnscan.report.QUICK_OPTIONS`, its
baselines and noise level): captum for the gradient methods and Guided Grad-CAM (its
GuidedBackprop and Deconvolution override nn.ReLU only, so on this ReLU6 model they cost a
plain gradient), pytorch-grad-cam for the CAMs at the default layer (the head's activation,
on a copy where it is a module of its own: `cnnscan.layers.unshare`), torchcam for CAM,
zennit for LRP (EpsilonPlus, canonizers from tests/helpers.py), lucent for the class image
(the scan's steps and size), quantus PixelFlipping for the leaderboard's deletion and
insertion curves of the top-1 class (every map and the two random references; quantus
counts each channel value as a feature and steps by a divisor of the pixel count, so its
curves take a few more forwards than ours: their time is scaled to our forward count), and
the top-layer randomization check as a re-run of every method on a copy with `_fc`
re-initialized, compared with quantus' Spearman (quantus' MPRT randomizes every layer, not
the top one only). The rest of the report (layer table, filters and feature maps, receptive
fields, completeness, writing the files) has no peer piece: the ratio is of whole runs, the
peers doing less. Each piece is timed once; the peers' total includes their imports (in a
fresh interpreter) and the model load; ours is the command's wall time. Torch's default
threads and the command's OpenMP spin (`SPIN`) on both sides. Timing on a shared machine
is noisy: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_grad_cam as pgc
import quantus
import torch
import torch.nn.functional as F
from captum import attr
from lucent.optvis import param, render
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from timing import best_time
from torchcam.methods import CAM
from zennit.composites import EpsilonPlus

import cnnscan
from cnnscan.choices import CLASS_IMAGE_STEPS
from cnnscan.layers import unshare
from cnnscan.methods import get_method
from cnnscan.methods.baselines import gaussian_blur
from cnnscan.report import CLASS_IMAGE_PX, LEADERBOARD, QUICK_OPTIONS, default_methods

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import efficientnet_lite_canonizers, zennit_lrp

CNNSCAN = str(Path(sys.executable).with_name("cnnscan"))  # the console script pip installed
ENV = {**os.environ, "NO_SANDBOX_OMP": "1"}  # no OpenMP policy forced on the command
# The command's OpenMP spin (cnnscan/cli.py sets it before torch loads), given to the peers
# too: with libgomp's long default spin, a 2-core machine shared with other jobs slows them
# by up to 100x per forward, which would measure the waiting policy, not the libraries.
SPIN = {"GOMP_SPINCOUNT": "10000"}
PEER_IMPORTS = "import torch, torchvision, captum.attr, pytorch_grad_cam, torchcam.methods, "
PEER_IMPORTS += "zennit.composites, quantus, lucent.optvis.render"
STARTUP = "start-up, forward, writing"  # ours: wall time less every other stage
NOISY_LOAD = 1.5

Pieces = dict[str, tuple[str, float]]  # piece -> (peer library, seconds)


@dataclass
class Scanned:
    report_s: float  # process start to "scanned in ..." (the report is written)
    first_map_s: float  # process start to "gradcam of ... (X.X s)"
    stages: dict[str, float]  # timings.json


def print_load(when: str) -> None:
    load = os.getloadavg()
    print(f"load average {when}: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if load[0] > NOISY_LOAD:
        print(f"  warning: load above {NOISY_LOAD}: the times are noisy")


def scan_once(image: str) -> Scanned:
    """One `cnnscan scan`, its printed lines timed as they arrive."""
    with tempfile.TemporaryDirectory() as out:
        began = time.perf_counter()
        command = [CNNSCAN, "scan", image, "--out", out, "--quiet"]
        child = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV
        )
        seen, lines = {}, []
        for line in child.stdout:
            lines.append(line)
            if re.search(r" of .*\(\d+\.\d s\)$", line.rstrip()):
                seen.setdefault("first map", time.perf_counter() - began)
            if line.startswith("scanned in"):
                seen["report"] = time.perf_counter() - began
        if child.wait() != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{''.join(lines)}")
        stages = json.loads((Path(out) / "timings.json").read_text())
    return Scanned(seen["report"], seen["first map"], stages)


def run_ours(image: str, repeat: int) -> Scanned:
    """The fastest of `repeat` scans (printed with the peak memory of all of them) and
    `cnnscan --help`'s best time."""
    best = min((scan_once(image) for _ in range(repeat)), key=lambda run: run.report_s)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    help_s, _ = best_time(
        lambda: subprocess.run([CNNSCAN, "--help"], check=True, capture_output=True, env=ENV),
        repeat,
    )
    print(
        f"cnnscan scan {image}, best of {repeat}: report written {best.report_s:.1f} s after "
        f"the process started, first map printed at {best.first_map_s:.1f} s, peak RSS "
        f"{peak:.0f} MB; cnnscan --help {help_s:.2f} s"
    )
    return best


def timed(pieces: Pieces, name: str, library: str, fn: Callable[[], object]) -> object:
    """fn's result, its seconds recorded under `name`; None (and a line saying why) if the
    peer failed, so that one failing peer does not stop the run."""
    began = time.perf_counter()
    try:
        result = fn()
    except Exception as e:
        print(f"  {library} failed on {name}: {type(e).__name__}: {e}")
        return None
    pieces[name] = (library, time.perf_counter() - began)
    return result


def references(normalize: Callable, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The scan's reference inputs for `x` (1, 3, H, W), made as `cnnscan.methods.baselines`
    makes them: a black picture, a blurred copy, uniform noise pixels (all in model space)."""
    seeded = torch.Generator().manual_seed(0)
    return {
        "black": normalize(torch.zeros_like(x)),
        "blur": gaussian_blur(x, sigma=max(x.shape[-2:]) / 16),
        "noise": normalize(torch.rand(x.shape, generator=seeded)),
    }


def peer_methods(plain, peer, x, bases, options) -> dict[str, tuple[str, Callable]]:
    """Every method that has a peer equivalent, as its library documents it: {name:
    (library, run)}, where run(targets) gives one map (H, W) per target. `plain` is the
    model, `peer` its copy whose head activation is a module of its own (the layer the CAMs
    hook), `bases` the reference inputs (`references`), `options` the scan's options."""
    layer = peer._swish.calls[1]
    noise = get_method("smoothgrad").options()["noise_level"] * float(x.max() - x.min())

    def captum(explainer, **kwargs):
        def run(targets):
            return [
                explainer.attribute(x, target=t, **kwargs)[0].sum(0).detach().numpy()
                for t in targets
            ]

        return "captum", run

    def grad_cam(cls):
        def run(targets):
            with cls(model=peer, target_layers=[layer]) as cam:
                return [
                    cam(input_tensor=x, targets=[ClassifierOutputTarget(t)])[0] for t in targets
                ]

        return "pytorch-grad-cam", run

    def cam(targets):
        with CAM(peer, target_layer=layer, fc_layer="_fc") as extractor:
            scores = peer(x)
            maps = [extractor(t, scores)[0] for t in targets]
        return [F.interpolate(m[None], x.shape[-2:], mode="bilinear")[0, 0].numpy() for m in maps]

    def lrp(targets):
        composite = EpsilonPlus(canonizers=efficientnet_lite_canonizers(plain))
        return list(zennit_lrp(plain, x, targets, composite)[0].sum(1).numpy())

    return {
        "gradient": captum(attr.Saliency(plain)),
        "gradient_x_input": captum(attr.InputXGradient(plain)),
        "guided_backprop": captum(attr.GuidedBackprop(plain)),
        "deconvnet": captum(attr.Deconvolution(plain)),
        "smoothgrad": captum(
            attr.NoiseTunnel(attr.Saliency(plain)),
            nt_type="smoothgrad",
            nt_samples=options["smoothgrad"]["n_samples"],
            stdevs=noise,
        ),
        "integrated_gradients": captum(
            attr.IntegratedGradients(plain),
            baselines=bases["black"],
            n_steps=options["integrated_gradients"]["n_steps"],
            method="gausslegendre",
        ),
        "gradient_shap": captum(
            attr.GradientShap(plain),
            baselines=torch.cat(list(bases.values())),
            n_samples=options["gradient_shap"]["n_samples"],
        ),
        "gradcam": grad_cam(pgc.GradCAM),
        "gradcam_pp": grad_cam(pgc.GradCAMPlusPlus),
        "xgradcam": grad_cam(pgc.XGradCAM),
        "hirescam": grad_cam(pgc.HiResCAM),
        "layercam": grad_cam(pgc.LayerCAM),
        "cam": ("torchcam", cam),
        "eigencam": grad_cam(pgc.EigenCAM),
        "ablationcam": grad_cam(pgc.AblationCAM),
        "guided_gradcam": captum(attr.GuidedGradCam(peer, layer)),
        "lrp": ("zennit", lrp),
    }


def steps_per_curve(pixels: int, forwards: int) -> int:
    """quantus' `features_in_step` closest to `forwards` forwards per curve: it counts channel
    values as features (3 per pixel) and needs a divisor of the pixel count."""
    divisors = [d for d in range(1, pixels + 1) if pixels % d == 0]
    return min(divisors, key=lambda d: abs(math.ceil(3 * pixels / d) - forwards))


def curves(model, x, blurred, maps, target: int, features: int, insertion: bool) -> list:
    """quantus PixelFlipping curves of `maps` for `target`: deletion into zeros, or insertion
    (the pixels of `x` revealed into `blurred`), the scan's substrates."""
    original = x.numpy().reshape(1, -1)

    def reveal(arr, indices, **_):
        out = arr.copy()
        out[:, indices[0]] = original[:, indices[0]]
        return out

    start = blurred if insertion else x
    metric = quantus.PixelFlipping(
        features_in_step=features,
        perturb_baseline=0.0,
        perturb_func=reveal if insertion else None,
        normalise=False,
        abs=False,
        disable_warnings=True,
    )
    return [
        metric(
            model=model,
            x_batch=start.numpy(),
            y_batch=np.array([target]),
            a_batch=m[None, None],
            device="cpu",
            channel_first=True,
            softmax=True,
        )
        for m in maps
    ]


def randomized(module):
    """A copy of `module` whose top layer (the classifier, `_fc`) is re-initialized."""
    clone = copy.deepcopy(module)
    torch.manual_seed(0)
    clone._fc.reset_parameters()
    return clone


def run_peers(image: str) -> Pieces:
    """The default scan's content computed with the peer libraries, each piece timed."""
    pieces: Pieces = {}
    began = time.perf_counter()  # the imports in a fresh interpreter, as a user would pay them
    subprocess.run([sys.executable, "-c", PEER_IMPORTS], check=True, env=ENV)
    imports_s = time.perf_counter() - began
    began = time.perf_counter()
    model = cnnscan.load_model()
    x = model.preprocess(image)
    plain = model.module.eval()
    with torch.no_grad():
        targets = plain(x).topk(5).indices[0].tolist()
    peer = unshare(plain, "_swish", x)  # the head's activation as a module of its own
    pieces[STARTUP] = ("imports, model", imports_s + time.perf_counter() - began)

    bases = references(model.preprocessing.normalize, x)
    methods = peer_methods(plain, peer, x, bases, QUICK_OPTIONS)
    top1 = {}
    for name in default_methods():  # the registry's, so that a method added to it shows here
        if name not in methods:
            print(f"  {name}: in the default scan, no peer equivalent (not in the peers' total)")
            continue
        library, run = methods[name]
        maps = timed(pieces, name, library, lambda run=run: run(targets))
        if maps is not None:
            top1[name] = maps[0]

    def class_image():
        render.render_vis(
            plain,
            f"_fc:{targets[0]}",
            param_f=lambda: param.image(CLASS_IMAGE_PX),
            thresholds=(CLASS_IMAGE_STEPS,),
            show_image=False,
            progress=False,
        )

    timed(pieces, "class image", "lucent", class_image)

    h, w = x.shape[-2:]
    seeded = torch.Generator().manual_seed(0)
    chance = [
        torch.rand((h, w), generator=seeded).numpy(),  # the leaderboard's random references
        F.interpolate(torch.rand((1, 1, 7, 7), generator=seeded), (h, w))[0, 0].numpy(),
    ]
    ours = LEADERBOARD["default"]["steps"] - 1  # forwards per curve: the ends are known
    features = steps_per_curve(h * w, ours)
    forwards = math.ceil(3 * h * w / features)
    label = f"quantus ({forwards} forwards per curve, scaled to our {ours})"
    for kind in ("deletion", "insertion"):
        name = f"leaderboard: {kind}_auc"
        timed(
            pieces,
            name,
            label,
            lambda kind=kind: curves(
                plain,
                x,
                bases["blur"],
                [*top1.values(), *chance],
                targets[0],
                features,
                kind == "insertion",
            ),
        )
        if name in pieces:
            pieces[name] = (label, pieces[name][1] * ours / forwards)

    def model_randomization():
        module = randomized(plain)  # unshared anew: a copy of `peer` would hook `peer`'s calls
        again = peer_methods(module, unshare(module, "_swish", x), x, bases, QUICK_OPTIONS)
        return {
            name: quantus.similarity_func.correlation_spearman(
                np.ravel(top1[name]), np.ravel(again[name][1]([targets[0]])[0])
            )
            for name in top1
        }

    timed(pieces, "leaderboard: model_randomization", "re-run + quantus", model_randomization)
    return pieces


def print_table(ours: Scanned, peers: Pieces) -> None:
    stages = dict(ours.stages)
    stages[STARTUP] = ours.report_s - sum(stages.values()) + stages.pop("load + forward")
    print(f"{'piece':<34}{'ours s':>9}{'peers s':>9}{'ratio':>8}  peer")
    for name in [STARTUP, *(k for k in stages if k != STARTUP)]:
        library, theirs = peers.get(name, ("", None))
        row = f"{name:<34}{stages[name]:>9.2f}"
        if theirs is not None:
            row += f"{theirs:>9.2f}{theirs / stages[name]:>7.1f}x  {library}"
        print(row)
    print(f"{'total (ours: wall to report)':<34}{ours.report_s:>9.2f}", end="")
    if peers:
        total = sum(seconds for _, seconds in peers.values())
        print(f"{total:>9.2f}{total / ours.report_s:>7.1f}x  peers ÷ ours")
    else:
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="sample:chelsea")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-peers", action="store_true")
    args = parser.parse_args()
    if os.environ.get("GOMP_SPINCOUNT") is None:  # OpenMP reads it once: start again with it
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **SPIN})
    warnings.simplefilter("ignore")  # the peers' deprecation chatter
    print_load("before")

    ours = run_ours(args.image, args.repeat)
    peers = {} if args.skip_peers else run_peers(args.image)
    if peers:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peers in one process: peak RSS {peak:.0f} MB")
    print_table(ours, peers)
    print_load("after")


if __name__ == "__main__":
    main()
