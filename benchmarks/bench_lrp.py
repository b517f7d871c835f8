"""LRP for the top-5 classes: cnnscan vs zennit 0.5.1 on the default model.

    python benchmarks/bench_lrp.py [--repeats 5] [--threads 2]

Default model (EfficientNet-Lite0, ImageNet weights) on sample:chelsea, CPU, 224×224.
zennit gets the canonizers it needs for this model (BatchNorm merged into each conv, skip
connections through its Sum module; tests/helpers.py) and runs one forward and backward
per target, as its attributors do; cnnscan runs one forward and one backward per target.
The plain gradient of the 5 targets (one forward, 5 backwards) is printed as the floor.
Timings are medians of `--repeats` runs after one warm-up, wall-clock and CPU time (steadier
when other jobs share the machine). The maps are compared first (zennit leaves x/√(1+ε) in
each merged BatchNorm, so they differ slightly here).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus

import cnnscan
from cnnscan.methods.lrp import input_bounds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import efficientnet_lite_canonizers, zennit_lrp


def median_time(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and CPU seconds (CPU time is steadier on a shared machine)."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = cnnscan.load_model()
    x = model.preprocess("sample:chelsea")
    reference = copy.deepcopy(model.module).eval()  # zennit's canonizers edit their module
    targets = reference(x).topk(5).indices[0].tolist()
    low, high = input_bounds(model.preprocessing, x)
    zennit = {
        "epsilon_plus": lambda: EpsilonPlus(canonizers=efficientnet_lite_canonizers(reference)),
        "epsilon_gamma_box": lambda: EpsilonGammaBox(
            low=low, high=high, canonizers=efficientnet_lite_canonizers(reference)
        ),
        "epsilon_alpha2_beta1": lambda: EpsilonAlpha2Beta1(
            canonizers=efficientnet_lite_canonizers(reference)
        ),
    }

    def gradient():
        return cnnscan.explain(model, x, "gradient", targets=[targets])

    forward = median_time(lambda: reference(x), args.repeats)
    floor = median_time(gradient, args.repeats)
    print(f"one forward: {forward[0]:.3f} s wall, {forward[1]:.3f} s CPU")
    print(f"plain gradient, 5 targets: {floor[0]:.3f} s wall, {floor[1]:.3f} s CPU")
    print(
        f"{'composite':24} {'cnnscan':>9} {'zennit':>9} {'ratio':>7} {'CPU ratio':>9} "
        f"{'min r':>9} {'sum err':>8}"
    )
    for name, make in zennit.items():

        def ours(name=name):
            return cnnscan.explain(model, x, "lrp", targets=[targets], composite=name)

        def theirs(make=make):
            return zennit_lrp(reference, x, targets, make())

        ours_maps, their_maps = ours().maps[0], theirs()[0]
        agreement = min(pearson(ours_maps[t], their_maps[t]) for t in range(5))
        sums = ours_maps.sum(dim=(1, 2, 3)), their_maps.sum(dim=(1, 2, 3))
        sum_err = float(((sums[0] - sums[1]).abs() / sums[1].abs()).max())
        t_ours, t_theirs = median_time(ours, args.repeats), median_time(theirs, args.repeats)
        print(
            f"{name:24} {t_ours[0]:8.3f}s {t_theirs[0]:8.3f}s {t_theirs[0] / t_ours[0]:6.2f}x "
            f"{t_theirs[1] / t_ours[1]:8.2f}x {agreement:9.6f} {sum_err:8.2%}"
        )


if __name__ == "__main__":
    main()
