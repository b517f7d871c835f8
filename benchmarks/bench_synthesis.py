"""Activation maximization: cnnscan.synthesize vs torch-lucent 0.1.8's render_vis, one run.

    python benchmarks/bench_synthesis.py                # 256 steps at 224 px
    python benchmarks/bench_synthesis.py --steps 64 --repeat 3   # quicker, best of 3

Default model (EfficientNet-Lite0), same objective, steps, size, parameterization (FFT,
decorrelated colours), transforms (lucent's standard set) and optimizer (Adam, lr 0.05).
lucent is called as documented (`model.eval()`, parameters left trainable, so its backward
also computes weight gradients) and, to isolate the rest, on a copy whose parameters need no
gradient. Prints the best of `--repeat` runs (ours and lucent's alternate, so that a
machine whose load changes affects both alike) and the ratios. Objectives: a channel in
the middle of the network (`_blocks.10`, where cnnscan stops the forward after the layer)
and a class logit (the whole network runs for both).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

import cnnscan

warnings.simplefilter("ignore")  # kornia 0.4 / lucent deprecation chatter


def lucent_run(module: torch.nn.Module, objective: str, steps: int, size: int) -> float:
    from lucent.optvis import param, render

    began = time.perf_counter()
    render.render_vis(
        module,
        objective,
        param_f=lambda: param.image(size),
        thresholds=(steps,),
        show_image=False,
        progress=False,
    )
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="best of N alternating runs")
    parser.add_argument("--skip-lucent", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = cnnscan.load_model()
    cases = [
        ("channel _blocks.10:5", "_blocks.10:5", "_blocks_10:5"),
        ("class logit 285", cnnscan.synthesis.class_logit(285), "_fc:285"),
    ]
    cnnscan.synthesize(model, "_blocks.2:0", steps=2, size=64, progress=False)  # warm-up
    print(f"{args.steps} steps at {args.size}x{args.size}, {args.threads} threads")
    print(f"{'objective':<24}{'cnnscan':>10}{'lucent':>10}{'ratio':>8}{'lucent*':>10}{'ratio':>8}")
    for label, ours, theirs in cases:
        times: dict[str, list[float]] = {"ours": [], "documented": [], "lean": []}
        for _ in range(args.repeat):
            result = cnnscan.synthesize(
                model, ours, steps=args.steps, size=args.size, progress=False
            )
            times["ours"].append(result.seconds)
            if not args.skip_lucent:
                as_documented = copy.deepcopy(model.module).eval()
                frozen = copy.deepcopy(model.module).eval().requires_grad_(False)
                times["documented"].append(lucent_run(as_documented, theirs, args.steps, args.size))
                times["lean"].append(lucent_run(frozen, theirs, args.steps, args.size))
        best = {key: min(values) for key, values in times.items() if values}
        row = f"{label:<24}{best['ours']:>9.1f}s"
        if not args.skip_lucent:
            for key in ("documented", "lean"):
                row += f"{best[key]:>9.1f}s{best[key] / best['ours']:>7.2f}x"
        print(row, f" objective {result.initial:.3g} -> {result.final:.3g}", flush=True)
    print("lucent* = lucent on a copy whose parameters need no gradient; ratio = lucent / ours")


if __name__ == "__main__":
    main()
