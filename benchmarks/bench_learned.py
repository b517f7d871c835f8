"""What the network learned: filters, feature maps, receptive fields and unit reconstructions,
timed against the plain forward they build on, in one run.

    python benchmarks/bench_learned.py [--repeat 5]

Default model (EfficientNet-Lite0) on sample:chelsea at 224 px, and VGG16 (random weights)
for the receptive fields. Prints best-of-`--repeat` times and ratios to a plain forward without
gradients, and feature maps of three layers against the usual approach of one hooked forward
per layer (captum's LayerActivation, one call per layer).
"""

from __future__ import annotations

import argparse

import torch
from captum.attr import LayerActivation
from timing import best_time

import cnnscan
from cnnscan import render
from cnnscan.engine.working_copy import forward_logits
from cnnscan.layers import get_module

LAYERS = ["_swish@0", "_blocks.5", "_conv_head"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = cnnscan.load_model()
    image = cnnscan.load_image("sample:chelsea")
    x = model.preprocess(image)
    module = model.module.eval()
    forward_logits(module, x)  # build the working copy once

    rows = []
    forward, _ = best_time(lambda: forward_logits(module, x), args.repeat)
    rows.append(("plain forward, no gradients (default model)", forward, 1.0))
    maps, _ = best_time(lambda: cnnscan.feature_maps(model, x, LAYERS), args.repeat)
    rows.append(("feature_maps, 3 layers, one forward", maps, maps / forward))

    def captum_style() -> None:  # one hooked forward per layer, as LayerActivation is used
        for name in ("_swish", "_blocks.5", "_conv_head"):
            LayerActivation(module, get_module(module, name)).attribute(x)

    per_layer, _ = best_time(captum_style, args.repeat)
    rows.append(("captum LayerActivation, one call per layer", per_layer, per_layer / forward))
    weights = cnnscan.filters(model)
    grid, _ = best_time(lambda: render.filter_grid(weights), args.repeat)
    rows.append(("filters + RGB grid of the first conv (32 filters)", grid, grid / forward))
    head = cnnscan.feature_maps(model, x, "_swish@1")["_swish@1"][0]
    top = cnnscan.top_channels(head, 32)
    feature_grid, _ = best_time(lambda: render.feature_grid(head, top), args.repeat)
    rows.append(("feature grid, top 32 of 1280 channels", feature_grid, feature_grid / forward))
    fields, _ = best_time(lambda: cnnscan.receptive_fields(model, x), args.repeat)
    rows.append(("receptive fields, 199 layer calls", fields, fields / forward))
    unit, _ = best_time(
        lambda: cnnscan.explain(model, x, "deconvnet", unit=("_blocks.5", 7)), args.repeat
    )
    rows.append(("DeconvNet of one unit (forward + backward)", unit, unit / forward))

    vgg = cnnscan.load_model("vgg16", weights=None)
    vgg_x = torch.zeros(1, 3, 224, 224)
    forward_logits(vgg.module, vgg_x)
    vgg_forward, _ = best_time(lambda: forward_logits(vgg.module, vgg_x), args.repeat)
    rows.append(("plain forward, no gradients (VGG16)", vgg_forward, 1.0))
    vgg_fields, _ = best_time(lambda: cnnscan.receptive_fields(vgg, vgg_x), args.repeat)
    rows.append(("receptive fields, VGG16 (41 layer calls)", vgg_fields, vgg_fields / vgg_forward))
    with torch.device("meta"):
        import torchvision

        shapes_only = torchvision.models.vgg16()
    meta, _ = best_time(
        lambda: cnnscan.receptive_fields(shapes_only, torch.zeros(1, 3, 224, 224, device="meta")),
        args.repeat,
    )
    rows.append(("receptive fields, VGG16 built on the meta device", meta, meta / vgg_forward))

    width = max(len(name) for name, _, _ in rows) + 2
    print(f"{'work':<{width}}{'best (ms)':>10}{'× forward':>11}")
    for name, seconds, ratio in rows:
        print(f"{name:<{width}}{seconds * 1000:>10.1f}{ratio:>11.2f}")


if __name__ == "__main__":
    main()
