"""RISE: cnnscan's time vs the bound of the same number of batched inference forwards.

    python benchmarks/bench_rise.py                # 4000 masks (about 2 × 1.5 min here)
    python benchmarks/bench_rise.py --masks 1000

Default model (EfficientNet-Lite0) on sample:chelsea at 224 px, 2 CPU threads, top-5 targets
(one set of masked forwards serves all five). The bound is `Scan.logits_at` on as many
copies of the image, built chunk by chunk like the masked inputs: the forwards alone, at the
same measured batch sizes. RISE adds mask generation and the Σ score·mask accumulation;
target: within 1.2× of the bound. Timings are noisy when other processes run; the ratio
comes from the same run.
"""

from __future__ import annotations

import argparse
import time

import torch

import cnnscan
from cnnscan.scan import make_scan


class Copies:
    """`n` copies of one input, built chunk by chunk."""

    def __init__(self, x: torch.Tensor, n: int):
        self.x, self.n = x, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.x.expand(len(range(*rows.indices(self.n))), -1, -1, -1).clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(2)

    model = cnnscan.load_model()
    x = model.preprocess("sample:chelsea")
    scan = make_scan(model, x)
    scan.logits_at(Copies(scan.inputs, 64))  # warm-up: working copy, learned batch size

    began = time.perf_counter()
    scan.logits_at(Copies(scan.inputs, args.masks))
    bound = time.perf_counter() - began

    began = time.perf_counter()
    attr = cnnscan.explain(model, x, "rise", targets="top5", n_masks=args.masks, scan=scan)
    ours = time.perf_counter() - began

    print(f"{args.masks} batched inference forwards (the bound): {bound:7.1f} s")
    print(f"RISE, {args.masks} masks, top-5 targets:           {ours:7.1f} s")
    print(f"RISE / bound: {ours / bound:.3f} (target <= 1.2); forwards: {attr.extras['forwards']}")


if __name__ == "__main__":
    main()
