"""The methods of PAIR saliency 0.2.1 that cnnscan has: cnnscan vs `saliency.core`.

    python benchmarks/bench_pair.py [--repeat 2]

Default model on sample:chelsea, its top-3 classes, CPU, 2 threads, both sides at PAIR's
defaults (Blur IG: 100 steps to σ = 50). PAIR explains one image and one class per call and
takes the gradients from a `call_model_function` (here: the module in float32, batches of
`batch_size` path points, 1 by default and 16 as well). Prints the best time of `--repeat`,
the speed-up (PAIR / cnnscan) and the Pearson r of the maps.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import saliency.core as pair
import torch
from timing import best_time

import cnnscan


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    stacked = torch.stack([a.flatten().double(), b.flatten().double()])
    return float(torch.corrcoef(stacked)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
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

    ours_s, attr = best_time(lambda: cnnscan.explain(model, x, "blur_ig", targets=[targets]), 1)
    for batch_size in (1, 16):
        theirs_s, maps = best_time(lambda batch_size=batch_size: theirs(batch_size), args.repeat)
        print(
            f"blur_ig (PAIR batch {batch_size:2d})  cnnscan {ours_s:7.3f} s   "
            f"PAIR {theirs_s:7.3f} s   speed-up {theirs_s / ours_s:5.2f}x   "
            f"r = {pearson(attr.maps[0], maps):.6f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
