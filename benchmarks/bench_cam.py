"""CAM family: cnnscan vs pytorch-grad-cam 1.5.7 and torchcam 0.5.0, in one run.

    python benchmarks/bench_cam.py             # everything (the peers take several minutes)
    python benchmarks/bench_cam.py --skip-slow # without the masking CAMs

Default model (EfficientNet-Lite0) on sample:chelsea at 224 px, 2 CPU threads. Each peer
is used as documented (a `with` block per method, one call per target); for the default
model the peers hook a copy whose head activation is its own module
(`cnnscan.layers.unshare`), since they cannot pick the second call of the shared `_swish`.
Prints times (best of `--repeat`), the speed-up ratios and the Pearson r of the maps.
Score-CAM is compared with pytorch-grad-cam using `align_corners=True` (its mask
convention) and with torchcam using the default (torchcam's convention). The sampling CAMs
run with the same (small) sample counts on both sides. ReciproCAM's reference is its paper's
algorithm written plainly (openvino-xai does not install beside this environment's numpy):
the trunk once, then the head on the h·w one-position copies of the feature map in one batch,
as the authors' first code does.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
import pytorch_grad_cam as pgc
import torch
import torchcam.methods as tcm
from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, ClassifierOutputTarget
from timing import best_time

import cnnscan
from cnnscan.layers import unshare

GRADIENT_CAMS = {
    "gradcam": pgc.GradCAM,
    "gradcam_pp": pgc.GradCAMPlusPlus,
    "xgradcam": pgc.XGradCAM,
    "layercam": pgc.LayerCAM,
    "hirescam": pgc.HiResCAM,
}


def pearson(a, b) -> float:
    a = torch.as_tensor(np.asarray(a), dtype=torch.float64).flatten()
    b = torch.as_tensor(np.asarray(b), dtype=torch.float64).flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def at_input(attr: cnnscan.Attribution, t: int) -> torch.Tensor:
    full = attr.upsample()[0, t, 0]
    full = full - full.min()
    return full / full.max().clamp_min(1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--skip-slow", action="store_true", help="skip the CAMs that mask or sample the input"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)

    model = cnnscan.load_model()
    x = model.preprocess("sample:chelsea")
    peer = unshare(model.module, "_swish", x).eval()
    layer = peer._swish.calls[1]
    targets = [p["class_id"] for p in cnnscan.predict(model, x, k=5)[0]]
    rows = []

    def forward():
        with torch.no_grad():
            model.module(x)

    forward_s, _ = best_time(forward, 5)
    print(f"one forward of the default model: {forward_s * 1e3:.1f} ms")

    # 5 gradient CAMs x top-5 targets
    def peers_gradient_cams():
        maps = {}
        for name, cls in GRADIENT_CAMS.items():
            with cls(model=peer, target_layers=[layer]) as extractor:
                for class_id in targets:
                    target = [ClassifierOutputTarget(class_id)]
                    maps[name, class_id] = extractor(input_tensor=x, targets=target)[0]
        return maps

    def ours_gradient_cams():
        return cnnscan.explain_many(model, x, list(GRADIENT_CAMS), targets="top5")

    ours_gradient_cams()  # warm-up (builds the working copy)
    theirs_s, theirs = best_time(peers_gradient_cams, args.repeat)
    ours_s, ours = best_time(ours_gradient_cams, args.repeat)
    r = min(
        pearson(at_input(ours[name], t), theirs[name, class_id])
        for name in GRADIENT_CAMS
        for t, class_id in enumerate(targets)
    )
    rows.append(("5 gradient CAMs x top-5", "pytorch-grad-cam", theirs_s, ours_s, r, 30))

    if not args.skip_slow:
        class_id = targets[0]
        ours_s, ours = best_time(
            lambda: cnnscan.explain(model, x, "scorecam", targets=[class_id]), 1
        )
        aligned_s, aligned = best_time(
            lambda: cnnscan.explain(model, x, "scorecam", targets=[class_id], align_corners=True),
            1,
        )

        def pgc_scorecam():
            with pgc.ScoreCAM(model=peer, target_layers=[layer]) as extractor:
                return extractor(input_tensor=x, targets=[ClassifierOutputTarget(class_id)])[0]

        def torchcam_scorecam():
            with tcm.ScoreCAM(peer, target_layer=layer) as extractor:
                return extractor(class_idx=class_id, scores=peer(x))[0][0]

        theirs_s, theirs = best_time(pgc_scorecam, 1)
        rows.append(
            (
                "Score-CAM top-1",
                "pytorch-grad-cam",
                theirs_s,
                aligned_s,
                pearson(at_input(aligned, 0), theirs),
                2,
            )
        )
        theirs_s, theirs = best_time(torchcam_scorecam, 1)
        rows.append(
            (
                "Score-CAM top-1",
                "torchcam",
                theirs_s,
                ours_s,
                pearson(ours.maps[0, 0, 0], theirs),
                2,
            )
        )

        def pgc_ablation():
            with pgc.AblationCAM(model=peer, target_layers=[layer]) as extractor:
                return extractor(input_tensor=x, targets=[ClassifierOutputTarget(class_id)])[0]

        ours_s, ours = best_time(
            lambda: cnnscan.explain(model, x, "ablationcam", targets=[class_id]), args.repeat
        )
        theirs_s, theirs = best_time(pgc_ablation, 1)
        rows.append(
            (
                "Ablation-CAM top-1",
                "pytorch-grad-cam",
                theirs_s,
                ours_s,
                pearson(at_input(ours, 0), theirs),
                20,
            )
        )

    rows += new_methods(model, x, peer, layer, targets, args.repeat, args.skip_slow)
    print(
        f"{'work':<26}{'reference':<18}{'theirs s':>10}{'ours s':>9}{'ratio':>8}"
        f"{'target':>8}{'r':>9}"
    )
    for work, reference, theirs_s, ours_s, r, target in rows:
        ratio = theirs_s / ours_s
        verdict = "ok" if ratio >= target else "MISS"
        print(
            f"{work:<26}{reference:<18}{theirs_s:>10.3f}{ours_s:>9.3f}{ratio:>7.1f}x"
            f"{'≥' + str(target) + 'x':>8}{r:>9.4f}  {verdict}"
        )


def _pgc(cls: type, peer, layer, x: torch.Tensor, target: Any, **options: Any) -> np.ndarray:
    """One target's map (`target=None`: the class chooses, as FinerCAM's `target_idx`)."""
    targets = None if target is None else [target]
    with cls(model=peer, target_layers=[layer]) as extractor:
        return extractor(input_tensor=x.clone(), targets=targets, **options)[0]


def _mosaic_reciprocam(peer, layer, x: torch.Tensor, class_ids: list[int]) -> torch.Tensor:
    """ReciproCAM as its authors' first code runs it: the trunk once (a hook keeps the
    layer's output), then the head (here the default model's pooling, dropout, fc) on all
    h·w one-position copies in one batch; the maps are the softmax probabilities."""
    kept = {}
    handle = layer.register_forward_hook(lambda _m, _i, output: kept.setdefault("a", output))
    try:
        with torch.no_grad():
            peer(x)
            feature = kept["a"]
            h, w = feature.shape[-2:]
            mosaic = feature * torch.eye(h * w).view(h * w, 1, h, w)
            pooled = peer._avg_pooling(mosaic).flatten(1)
            probabilities = peer._fc(peer._dropout(pooled)).softmax(dim=1)
    finally:
        handle.remove()
    return probabilities[:, class_ids].T.reshape(len(class_ids), h, w)


def new_methods(model, x, peer, layer, targets: list[int], repeat: int, skip_slow: bool) -> list:
    """The methods added for issue 18, each against its reference: rows as in `main`."""
    rows = []

    def row(
        work: str,
        reference: str,
        theirs: Callable[[], Any],
        ours: Callable[[], Any],
        r: Callable[[Any, Any], float],
        target: float,
        times: int = repeat,
    ) -> None:
        ours()  # warm-up
        theirs_s, their_maps = best_time(theirs, times)
        ours_s, our_maps = best_time(ours, times)
        rows.append((work, reference, theirs_s, ours_s, r(our_maps, their_maps), target))

    def per_target(name: str) -> Callable[[Any, Any], float]:
        def r(ours, theirs) -> float:
            values = []
            for t, map_ in enumerate(theirs):
                value = pearson(at_input(ours, t), map_)
                if name == "eigengradcam":  # pytorch-grad-cam leaves SVD's sign to LAPACK
                    flipped = -ours.extras["raw"][:, t].clamp_max(0)
                    full = torch.nn.functional.interpolate(
                        flipped, size=x.shape[-2:], mode="bilinear"
                    )[0, 0]
                    value = max(value, pearson(full, map_))
                values.append(value)
            return min(values)

        return r

    gradient_peers = {
        "gradcam_elementwise": lambda c: _pgc(
            pgc.GradCAMElementWise, peer, layer, x, ClassifierOutputTarget(c)
        ),
        "eigengradcam": lambda c: _pgc(pgc.EigenGradCAM, peer, layer, x, ClassifierOutputTarget(c)),
        "shapleycam": lambda c: _pgc(pgc.ShapleyCAM, peer, layer, x, ClassifierOutputReST(c)),
        "finercam": lambda c: _pgc(pgc.FinerCAM, peer, layer, x, None, target_idx=c),
    }
    for name, theirs in gradient_peers.items():
        row(
            f"{name} top-5",
            "pytorch-grad-cam",
            lambda theirs=theirs: [theirs(c) for c in targets],
            lambda name=name: cnnscan.explain(model, x, name, targets="top5"),
            per_target(name),
            1,
        )

    def pgc_fullgrad():
        with pgc.FullGrad(model=peer, target_layers=[]) as extractor:
            return [
                extractor(input_tensor=x.clone(), targets=[ClassifierOutputTarget(c)])[0]
                for c in targets
            ]

    row(
        "fullgrad top-5",
        "pytorch-grad-cam",
        pgc_fullgrad,
        lambda: cnnscan.explain(model, x, "fullgrad", targets="top5"),
        per_target("fullgrad"),
        1,
    )
    for name, cls in [("kpcacam", pgc.KPCA_CAM), ("fem", pgc.FEM)]:
        row(
            f"{name}",
            "pytorch-grad-cam",
            lambda cls=cls: [_pgc(cls, peer, layer, x, ClassifierOutputTarget(targets[0]))],
            lambda name=name: cnnscan.explain(model, x, name, targets="top1"),
            per_target(name),
            1,
        )

    def pgc_dff():
        factorize = pgc.DeepFeatureFactorization(
            model=peer, target_layer=layer, computation_on_concepts=peer._fc
        )
        try:
            return factorize(x, n_components=5)
        finally:
            factorize.activations_and_grads.release()

    def dff_r(ours, theirs) -> float:
        maps = ours.extras["concepts"]["maps"].unsqueeze(2)
        full = torch.nn.functional.interpolate(maps[0], size=x.shape[-2:], mode="bilinear")
        return min(pearson(full[j, 0], theirs[1][0][j]) for j in range(5))

    row(
        "dff (5 concepts) top-5",
        "pytorch-grad-cam",
        pgc_dff,
        lambda: cnnscan.explain(model, x, "dff", targets="top5"),
        dff_r,
        1,
    )
    row(
        "reciprocam top-5",
        "the paper's way",
        lambda: _mosaic_reciprocam(peer, layer, x, targets),
        lambda: cnnscan.explain(model, x, "reciprocam", targets="top5"),
        lambda ours, theirs: min(
            pearson(ours.maps[0, t, 0], theirs[t]) for t in range(len(targets))
        ),
        1,
    )

    span = float(x.max() - x.min())

    def torchcam_smooth():
        with tcm.SmoothGradCAMpp(peer, target_layer=layer, num_samples=4, std=0.3) as extractor:
            maps = []
            for c in targets[:1]:
                scores = peer(x)
                torch.manual_seed(0)
                maps.append(extractor(class_idx=c, scores=scores)[0][0])
            return maps

    row(
        "smoothgradcam_pp top-1",
        "torchcam",
        torchcam_smooth,
        lambda: cnnscan.explain(
            model, x, "smoothgradcam_pp", targets="top1", n_samples=4, noise_level=0.3 / span
        ),
        lambda ours, theirs: pearson(ours.maps[0, 0, 0], theirs[0]),
        2,
    )
    if skip_slow:
        return rows
    for name, cls in [("iscam", tcm.ISCAM), ("sscam", tcm.SSCAM)]:

        def theirs(cls=cls):
            with cls(peer, target_layer=layer, num_samples=2) as extractor:
                scores = peer(x)
                torch.manual_seed(0)
                return extractor(class_idx=targets[0], scores=scores)[0][0]

        row(
            f"{name} (2 samples) top-1",
            "torchcam",
            theirs,
            lambda name=name: cnnscan.explain(model, x, name, targets="top1", n_samples=2),
            lambda ours, theirs: pearson(ours.maps[0, 0, 0], theirs),
            2,
            times=1,
        )
    return rows


if __name__ == "__main__":
    main()
