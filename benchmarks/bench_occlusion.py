"""Occlusion: cnnscan vs captum 0.9.0 Occlusion, in one run.

    python benchmarks/bench_occlusion.py                 # window 16, stride 8; captum at 1, 16, 64
    python benchmarks/bench_occlusion.py --ppe 16        # captum only at its usual best

Default model (EfficientNet-Lite0) on sample:chelsea at 224 px, 2 CPU threads (`--threads`),
top-1 class, zero baseline, logit space (captum's forward is the model). captum runs at each
`perturbations_per_eval`; the best is the reference. cnnscan runs twice: as it does by
default (incremental inference through the traced model) and with `incremental=False`
(plain batched forwards on the channels-last working copy), to show what each part buys.
Prints wall-clock and process CPU times (best of `--repeat`), their ratios, and the
agreement of the maps (Pearson r, max |difference|). Other processes on the machine make
wall-clock times noisy (CPU time is steadier when the machine is shared); the ratios come
from the same run.
"""

from __future__ import annotations

import argparse
import time

import torch
from captum.attr import Occlusion

import cnnscan


def best_time(fn, repeat: int) -> tuple[tuple[float, float], object]:
    """((wall seconds, CPU seconds), result), each time the best of `repeat` runs."""
    wall, cpu, result = float("inf"), float("inf"), None
    for _ in range(repeat):
        began, began_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall = min(wall, time.perf_counter() - began)
        cpu = min(cpu, time.process_time() - began_cpu)
    return (wall, cpu), result


def show(seconds: tuple[float, float]) -> str:
    return f"{seconds[0]:7.2f} s wall, {seconds[1]:7.2f} s CPU"


def ratio(slow: tuple[float, float], fast: tuple[float, float]) -> str:
    return f"{slow[0] / fast[0]:.2f}x wall, {slow[1] / fast[1]:.2f}x CPU"


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--ppe", default="1,16,64", help="captum perturbations_per_eval values")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = cnnscan.load_model()
    x = model.preprocess("sample:chelsea")
    class_id = cnnscan.predict(model, x, k=1)[0][0]["class_id"]
    options = {"window": args.window, "stride": args.stride, "fill": "zero", "space": "logit"}

    def ours(incremental: bool):
        return cnnscan.explain(
            model, x, "occlusion", targets=[class_id], incremental=incremental, **options
        )

    for incremental in (True, False):  # warm-up: working copy, learned batch sizes
        warm = {**options, "stride": args.window}
        cnnscan.explain(model, x, "occlusion", targets=[class_id], incremental=incremental, **warm)
    ours_s, attr = best_time(lambda: ours(True), args.repeat)
    plain_s, plain = best_time(lambda: ours(False), args.repeat)
    print(f"windows: {attr.extras['windows']} = {attr.extras['forwards']} occluded copies")
    print(f"cnnscan incremental: {show(ours_s)} (incremental={attr.extras['incremental']})")
    print(f"cnnscan plain:       {show(plain_s)}")

    net = model.module.eval()
    captum_times = {}
    reference = None
    for ppe in (int(v) for v in args.ppe.split(",")):

        def theirs(ppe=ppe):
            return Occlusion(net).attribute(
                x,
                sliding_window_shapes=(3, args.window, args.window),
                strides=(3, args.stride, args.stride),
                baselines=0.0,
                target=class_id,
                perturbations_per_eval=ppe,
            )

        captum_times[ppe], reference = best_time(theirs, args.repeat)
        print(f"captum ppe={ppe:<3}:     {show(captum_times[ppe])}")
    best_ppe = min(captum_times, key=lambda ppe: captum_times[ppe][0])
    best = captum_times[best_ppe]
    ours_map, ref_map = attr.maps[0, 0, 0], reference[0, 0]
    print()
    print(f"speed-up vs captum at its best (ppe={best_ppe}): {ratio(best, ours_s)} (target 1.5x)")
    print(f"incremental vs plain batched forwards:    {ratio(plain_s, ours_s)}")
    print(f"plain vs captum best:                     {ratio(best, plain_s)}")
    print(
        f"maps: Pearson r = {pearson(ours_map, ref_map):.6f}, max |diff| = "
        f"{float((ours_map - ref_map).abs().max()):.2e} (map range "
        f"{float(ref_map.min()):.3f}..{float(ref_map.max()):.3f}); plain vs captum r = "
        f"{pearson(plain.maps[0, 0, 0], ref_map):.6f}"
    )


if __name__ == "__main__":
    main()
