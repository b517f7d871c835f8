"""The methods of torchray 1.0.0.2 that cnnscan has: cnnscan vs `torchray.attribution`.

    python benchmarks/bench_torchray.py [--repeat 2] [--max-iter 50]

Default model on sample:chelsea, its top-3 classes, CPU, 2 threads. torchray explains one
class per call (one mask per call for extremal perturbation: `--max-iter` steps of one
forward and backward, torchray's other defaults); cnnscan explains the three in one call
(one batch of three masks per step). Excitation backprop at the last feature map before
its activation (`_bn1`; the default layer is a call of the shared `_swish`, which torchray's
probe cannot name), plain and contrastive (torchray's contrast layer: the classifier's
input). Prints the best time of `--repeat`, the speed-up (torchray / cnnscan) and the
Pearson r of the maps.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from timing import best_time
from torchray.attribution.excitation_backprop import (
    contrastive_excitation_backprop,
    excitation_backprop,
)
from torchray.attribution.extremal_perturbation import extremal_perturbation

import cnnscan
from cnnscan.methods.excitation import classifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import pearson


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--max-iter", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, 2 threads, load {os.getloadavg()}")
    model = cnnscan.load_model()
    module = model.module.eval()
    x = model.preprocess("sample:chelsea")
    targets = [p["class_id"] for p in cnnscan.predict(model, x, k=3)[0]]
    layer, contrast, head = "_bn1", "_dropout", classifier(module)  # _dropout feeds _fc
    runs = {
        "excitation_backprop": (
            {"layer": layer},
            lambda t: excitation_backprop(module, x.clone(), t, saliency_layer=layer),
        ),
        "excitation_backprop (contrastive)": (
            {"layer": layer, "contrastive": True},
            lambda t: contrastive_excitation_backprop(module, x.clone(), t, layer, contrast, head),
        ),
        f"extremal_perturbation ({args.max_iter} steps)": (
            {"max_iter": args.max_iter},
            lambda t: extremal_perturbation(module, x.clone(), t, max_iter=args.max_iter)[0],
        ),
    }
    for name, (options, call) in runs.items():
        method = name.split(" ")[0]
        ours_s, attr = best_time(
            lambda method=method, options=options: cnnscan.explain(
                model, x, method, targets=[targets], **options
            ),
            args.repeat,
        )
        theirs_s, maps = best_time(
            lambda call=call: torch.cat([call(t) for t in targets]), args.repeat
        )
        print(
            f"{name:42s} cnnscan {ours_s:7.3f} s   torchray {theirs_s:7.3f} s   "
            f"speed-up {theirs_s / ours_s:5.2f}x   r = {pearson(attr.maps[0], maps):.6f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
