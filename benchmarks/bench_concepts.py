"""Concepts (CRP) for the top-1 class: cnnscan vs zennit-crp 0.6.0 on vgg16.

    python benchmarks/bench_concepts.py [--repeat 3] [--threads 2] [--top 6]

vgg16 with random weights (seed 0) on sample:chelsea, CPU, 224×224, the last block
(`features.29`), the ε-plus composite on both sides. Timed, in one run:
- one LRP map of the top-1 class (cnnscan `explain(..., "lrp")`): the unit;
- cnnscan `concepts(..., top=6, check=False, pictures=False)`: the relevance of every
  channel at the layer and the conditional heatmaps of the top 6, all conditions in one
  batch;
- zennit-crp doing the same: `CondAttribution` with `record_layer` for the channels'
  relevance, then the 6 conditions `{"y": [c], layer: [k]}` as one call (its batch).
The maps are compared first (smallest Pearson r over the concepts). Best of `--repeat`.
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from crp.attribution import CondAttribution
from timing import best_time
from zennit.composites import EpsilonPlus

import cnnscan

LAYER = "features.29"


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    net = torchvision.models.vgg16(weights=None).eval()
    x = cnnscan.load_model(net).preprocess("sample:chelsea")
    target = int(net(x).argmax())
    reference = torchvision.models.vgg16(weights=None).eval()
    reference.load_state_dict(net.state_dict())  # zennit-crp freezes its model's parameters
    attribution = CondAttribution(reference)

    def ours():
        return cnnscan.concepts(
            net,
            x,
            [target],
            layer=LAYER,
            top=args.top,
            composite="epsilon_plus",
            check=False,
            pictures=False,
        )[0]

    def theirs():
        leaf = x.clone().requires_grad_(True)
        whole = attribution(leaf, [{"y": [target]}], EpsilonPlus(), record_layer=[LAYER])
        channels = whole.relevances[LAYER][0].sum(dim=(1, 2))
        top = channels.argsort(descending=True)[: args.top].tolist()
        conditions = [{"y": [target], LAYER: [k]} for k in top]
        return top, attribution(leaf, conditions, EpsilonPlus()).heatmap

    def one_map():
        return cnnscan.explain(net, x, "lrp", targets=[target], composite="epsilon_plus")

    found, (top, maps) = ours(), theirs()
    assert [c.channel for c in found.concepts] == top, "the rankings differ"
    r = min(pearson(c.heatmap, m) for c, m in zip(found.concepts, maps, strict=True))
    print(f"vgg16 (random weights), {LAYER}, top-1 class {target}, {args.top} concepts")
    print(f"smallest Pearson r of the conditional heatmaps vs zennit-crp: {r:.6f}")

    unit, _ = best_time(one_map, args.repeat)
    mine, _ = best_time(ours, args.repeat)
    crp, _ = best_time(theirs, args.repeat)
    print(f"one LRP map (cnnscan):           {unit:7.2f} s")
    print(f"concepts, cnnscan:               {mine:7.2f} s  ({mine / unit:.1f}× one LRP map)")
    print(f"concepts, zennit-crp 0.6.0:      {crp:7.2f} s  ({crp / mine:.1f}× cnnscan)")


if __name__ == "__main__":
    main()
