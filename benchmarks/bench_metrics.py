"""Evaluation metrics: cnnscan vs quantus 0.6.0 and pytorch-grad-cam 1.5.7, in one run.

    python benchmarks/bench_metrics.py            # 224 steps, as RISE's single-image setting
    python benchmarks/bench_metrics.py --steps 50 --repeat 3

Default model (EfficientNet-Lite0) on sample:chelsea at 224 px, Grad-CAM's map for the
top-1 class. Compared, each at its documented settings:
- deletion (zero substrate): cnnscan vs quantus PixelFlipping (`features_in_step` = 3 × the
  pixels of one step, zero baseline), which runs one forward per step;
- deletion + insertion: cnnscan vs the RISE reference loop (one forward per step, batch 1,
  as in the paper's `CausalMetric`), re-typed here since it is not a package;
- both against the forward-throughput bound: the same number of plain forwards of random
  inputs through `Scan.logits_at` (what the metric cannot beat without a cheaper forward);
- average drop: cnnscan vs pytorch-grad-cam's CamMultImageConfidenceChange (one forward).
Prints times (best of `--repeat`), ratios, forward counts, and the largest difference of
the curves. Timing on a shared machine is noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from timing import best_time

import cnnscan
from cnnscan.attribution import Attribution
from cnnscan.metrics.relevance import relevance
from cnnscan.scan import make_scan

SEEN = {"images": 0}  # module-level: cnnscan runs working copies of the model


class Counting(torch.nn.Module):
    """Counts the images that go through the wrapped module."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        SEEN["images"] += len(x)
        return self.module(x)


def rise_loop(net, x, rel, target, steps, substrate):
    """RISE's CausalMetric, one forward per step at batch 1: (deletion, insertion) curves."""
    h, w = rel.shape
    order = torch.argsort(rel.flatten(), descending=True)
    curves = []
    for mode in ("del", "ins"):
        start = x.clone() if mode == "del" else substrate.clone()
        finish = substrate if mode == "del" else x
        values = []
        with torch.no_grad():
            for i in range(steps + 1):
                values.append(float(net(start).softmax(1)[0, target]))
                lo = (2 * i * h * w + steps) // (2 * steps)
                hi = (2 * (i + 1) * h * w + steps) // (2 * steps)
                coords = order[lo:hi]
                start.view(1, 3, -1)[0, :, coords] = finish.view(1, 3, -1)[0, :, coords]
        curves.append(np.array(values))
    return curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(2)
    steps = args.steps

    model = cnnscan.load_model()
    picture = cnnscan.load_image("sample:chelsea")
    cam = cnnscan.explain(model, picture, "gradcam")
    # Grad-CAM's relevance with its ties (the relu'd zeros) broken by a tiny seeded noise, so
    # that every implementation removes the pixels in the same order.
    rel = relevance(cam)[0, 0]
    rel = rel + 1e-6 * torch.rand(rel.shape, generator=torch.Generator().manual_seed(0))
    attr = Attribution(
        maps=rel.view(1, 1, 1, *rel.shape),
        targets=cam.targets,
        method="gradcam",
        inputs=cam.inputs,
    )
    x = attr.inputs
    target = int(attr.targets[0, 0])
    counting = Counting(model.module).eval()
    counted = cnnscan.load_model(counting)
    scan = make_scan(counted, x)
    SEEN["images"] = 0
    print(f"default model, sample:chelsea, gradcam map, {steps} steps, 2 threads")

    def ours(metrics):
        return cnnscan.evaluate(
            counted, None, attr, metrics, steps=steps, substrate="zero", scan=scan
        )

    t_del, del_scores = best_time(lambda: ours(["deletion_auc"]), args.repeat)
    del_forwards = SEEN["images"] // args.repeat
    SEEN["images"] = 0
    t_both, both_scores = best_time(lambda: ours(["deletion_auc", "insertion_auc"]), args.repeat)
    both_forwards = SEEN["images"] // args.repeat
    print(f"cnnscan deletion           {t_del:8.2f} s  ({del_forwards} forwards)")
    print(f"cnnscan deletion+insertion {t_both:8.2f} s  ({both_forwards} forwards)")

    noise = torch.randn(both_forwards, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    t_bound, _ = best_time(lambda: scan.logits_at(noise[:del_forwards]), args.repeat)
    print(
        f"bound: {del_forwards} plain forwards {t_bound:8.2f} s  -> deletion at "
        f"{t_del / t_bound:.2f}x the forward-throughput bound"
    )

    try:
        import quantus
    except ImportError:
        quantus = None
    pixels = x.shape[-1] * x.shape[-2]
    if quantus is not None and pixels % steps == 0:
        # quantus counts channel values as features and needs features_in_step to divide
        # H·W, so whole-pixel steps are impossible on RGB images whose H·W is not a multiple
        # of 3: it removes one step's pixel count of values per step, i.e. 3 × the steps.
        per_step = pixels // steps
        metric = quantus.PixelFlipping(
            features_in_step=per_step,
            perturb_baseline=0.0,
            normalise=False,
            abs=False,
            disable_warnings=True,
        )
        net = model.module.eval()

        def theirs():
            return metric(
                model=net,
                x_batch=x.numpy(),
                y_batch=np.array([target]),
                a_batch=rel.view(1, 1, *rel.shape).numpy(),
                device="cpu",
                channel_first=True,
                softmax=True,
            )

        t_q, q_curve = best_time(theirs, args.repeat)
        whole_pixels = np.array(q_curve[0])[2::3]  # after every third step: whole pixels
        diff = np.abs(np.array(del_scores["curves"]["deletion"][1:]) - whole_pixels).max()
        print(
            f"quantus PixelFlipping      {t_q:8.2f} s  ({3 * steps} forwards) -> cnnscan "
            f"{t_q / t_del:.2f}x faster (max curve difference {diff:.2e})"
        )

    net = model.module.eval()
    substrate = torch.zeros_like(x)
    t_rise, (d, i) = best_time(lambda: rise_loop(net, x, rel, target, steps, substrate), 1)
    diff = max(
        np.abs(np.array(both_scores["curves"]["deletion"]) - d).max(),
        np.abs(np.array(both_scores["curves"]["insertion"]) - i).max(),
    )
    print(
        f"RISE loop, batch 1         {t_rise:8.2f} s  -> cnnscan {t_rise / t_both:.2f}x faster "
        f"(max curve difference {diff:.2e})"
    )

    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    cam = rel / rel.max()
    t_pgc, _ = best_time(
        lambda: CamMultImageConfidenceChange()(
            x, cam[None].numpy(), [ClassifierOutputSoftmaxTarget(target)], net
        ),
        max(3, args.repeat),
    )
    t_drop, _ = best_time(lambda: ours(["average_drop"]), max(3, args.repeat))
    print(
        f"average drop: cnnscan {t_drop:.3f} s, pytorch-grad-cam {t_pgc:.3f} s "
        f"-> ratio {t_pgc / t_drop:.2f}"
    )


if __name__ == "__main__":
    main()
