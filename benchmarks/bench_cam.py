"""CAM family: cnnscan vs pytorch-grad-cam 1.5.7 and torchcam 0.5.0, in one run.

    python benchmarks/bench_cam.py             # everything (the peers take ~1.5 min)
    python benchmarks/bench_cam.py --skip-slow # gradient CAMs only

Default model (EfficientNet-Lite0) on sample:chelsea at 224 px, 2 CPU threads. Each peer
is used as documented (a `with` block per method, one call per target); for the default
model the peers hook a copy whose head activation is its own module
(`cnnscan.layers.unshare`), since they cannot pick the second call of the shared `_swish`.
Prints times (best of `--repeat`), the speed-up ratios and the Pearson r of the maps.
Score-CAM is compared with pytorch-grad-cam using `align_corners=True` (its mask
convention) and with torchcam using the default (torchcam's convention).
"""

from __future__ import annotations

import argparse

import numpy as np
import pytorch_grad_cam as pgc
import torch
import torchcam.methods as tcm
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
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
    parser.add_argument("--skip-slow", action="store_true", help="skip Score-CAM/Ablation-CAM")
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


if __name__ == "__main__":
    main()
