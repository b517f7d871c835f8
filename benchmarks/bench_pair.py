"""The methods of PAIR saliency 0.2.1 that cnnscan has: cnnscan vs `saliency.core`.

    python benchmarks/bench_pair.py [--repeat 2] [--methods blur_ig,guided_ig,xrai]

Default model on sample:chelsea, its top-3 classes, CPU, 2 threads, both sides at PAIR's
defaults (Blur IG: 100 steps to σ = 50; Guided IG: 200 steps, fraction 0.25, max_dist 0.02;
XRAI: 100 IG steps from black and from white, cnnscan with n_steps=100 as well). PAIR explains
one image and one class per call and takes the gradients from a `call_model_function` (here:
the module in float32, batches of `batch_size` path points, 1 by default and 16 as well;
Guided IG's path is one point at a time). Prints the best time of `--repeat`, the speed-up
(PAIR / cnnscan) and the Pearson r of the maps.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import saliency.core as pair
import torch
from timing import best_time

import cnnscan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import pair_gradients, pair_guided_ig, pearson


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--methods", default="blur_ig,guided_ig,xrai")
    args = parser.parse_args()
    chosen = args.methods.split(",")
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, 2 threads, load {os.getloadavg()}")
    model = cnnscan.load_model()
    module = model.module.eval()
    x = model.preprocess("sample:chelsea")
    targets = [p["class_id"] for p in cnnscan.predict(model, x, k=3)[0]]
    image = x[0].permute(1, 2, 0).numpy()

    def call(batch, call_model_args=None, expected_keys=None):
        t = torch.tensor(np.asarray(batch)).permute(0, 3, 1, 2).requires_grad_(True)
        (grad,) = torch.autograd.grad(module(t)[:, call_model_args["target"]].sum(), t)
        return {pair.base.INPUT_OUTPUT_GRADIENTS: grad.permute(0, 2, 3, 1).numpy()}

    def theirs(batch_size: int) -> torch.Tensor:
        masks = [
            pair.BlurIG().GetMask(image, call, {"target": t}, batch_size=batch_size)
            for t in targets
        ]
        return torch.from_numpy(np.stack(masks)).permute(0, 3, 1, 2)

    def report(name: str, ours_s: float, theirs_s: float, ours, theirs, batch: str) -> None:
        print(
            f"{name:9s} (PAIR {batch})  cnnscan {ours_s:7.3f} s   PAIR {theirs_s:7.3f} s   "
            f"speed-up {theirs_s / ours_s:5.2f}x   r = {pearson(ours, theirs):.6f}",
            flush=True,
        )

    cnnscan.explain(model, x, "gradient", targets=[targets])  # working copy, batch sizes
    if "blur_ig" in chosen:
        ours_s, attr = best_time(lambda: cnnscan.explain(model, x, "blur_ig", targets=[targets]), 1)
        for batch_size in (1, 16):
            theirs_s, maps = best_time(lambda b=batch_size: theirs(b), args.repeat)
            report("blur_ig", ours_s, theirs_s, attr.maps[0], maps, f"batch {batch_size:2d}")

    if "guided_ig" in chosen:
        ours_s, attr = best_time(
            lambda: cnnscan.explain(model, x, "guided_ig", targets=[targets]), args.repeat
        )
        theirs_s, maps = best_time(
            lambda: torch.stack([pair_guided_ig(module, x, t) for t in targets]), args.repeat
        )
        report("guided_ig", ours_s, theirs_s, attr.maps[0], maps, "one point")

    def pair_xrai(batch_size: int) -> torch.Tensor:
        masks = [
            pair.XRAI().GetMask(image, pair_gradients(module, t), batch_size=batch_size)
            for t in targets
        ]
        return torch.from_numpy(np.stack(masks))

    if "xrai" in chosen:
        ours_s, attr = best_time(
            lambda: cnnscan.explain(model, x, "xrai", targets=[targets], n_steps=100), args.repeat
        )
        for batch_size in (1, 16):
            theirs_s, maps = best_time(lambda b=batch_size: pair_xrai(b), args.repeat)
            report("xrai", ours_s, theirs_s, attr.maps[0, :, 0], maps, f"batch {batch_size:2d}")


if __name__ == "__main__":
    main()
