"""The metrics of issue 19 against their references, cost and agreement, in one run.

    python benchmarks/bench_metrics_references.py
    python benchmarks/bench_metrics_references.py --repeat 3

Default model (EfficientNet-Lite0) at 224 px on gray versions of sample:chelsea, coffee and
astronaut (quantus 0.6's ROAD cannot take an RGB input with a one-channel map, so quantus gets
the gray channel and a wrapper that copies it to RGB and normalizes it; cnnscan gets the same
picture as its model input), gradient × input maps of each image's top-1 class:
- infidelity, 10 draws: cnnscan vs captum 0.9 `infidelity` (normalize=True, the same draws,
  all draws of an image in one batch);
- ROAD, 50 shares (1 %..99 %), noise 0: cnnscan vs quantus `ROAD`;
- sensitivity-n, 49 steps of 1,024 pixels: cnnscan vs quantus `SensitivityN`
  (features_in_step 1,024, the first 80 %, removed pixels set to gray 0.5 on both sides).
Prints seconds (best of `--repeat`), ratios and the largest difference of the results.
"""

from __future__ import annotations

import argparse

import numpy as np
import quantus
import torch
from captum.metrics import infidelity as captum_infidelity
from timing import best_time

import cnnscan
from cnnscan.metrics.infidelity import pixel_noise
from cnnscan.metrics.relevance import relevance
from cnnscan.scan import make_scan


class Gray(torch.nn.Module):
    """A gray picture in [0, 1] (N, 1, H, W) -> the model's logits."""

    def __init__(self, model: cnnscan.Model):
        super().__init__()
        self.module, self.prep = model.module, model.preprocessing

    def forward(self, x):
        return self.module(self.prep.normalize(x.float().expand(-1, 3, -1, -1)))


def report(metric: str, ours: float, reference: str, theirs: float, agreement: str) -> None:
    print(f"{metric:14} cnnscan {ours:7.2f} s  {reference} {theirs:7.2f} s", end="  ")
    print(f"-> cnnscan {theirs / ours:.2f}x as fast; {agreement}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    model = cnnscan.load_model()
    pictures = []
    for name in ("chelsea", "coffee", "astronaut"):
        picture = model.preprocessing.view(cnnscan.load_image(f"sample:{name}")).convert("L")
        pictures.append(torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255))
    gray = torch.stack(pictures).unsqueeze(1)  # (3, 1, 224, 224)
    x = model.preprocessing.normalize(gray.expand(-1, 3, -1, -1).contiguous())
    attr = cnnscan.explain(model, x, "gradient_x_input", targets="top1")
    target = attr.targets[:, 0]
    rel = relevance(attr)[:, 0]
    wrapped = Gray(model).eval()

    # infidelity
    ours_s, ours = best_time(
        lambda: cnnscan.evaluate(model, None, attr, ["infidelity"], n_samples=10), args.repeat
    )
    noise = pixel_noise(make_scan(model, x), 10, 0.02, seed=0)

    def theirs_run():
        draws = iter(noise.transpose(0, 1))

        def perturb(inputs):
            pert = next(draws).unsqueeze(1).expand_as(inputs)
            return pert, inputs - pert

        with torch.no_grad():
            return captum_infidelity(
                model.module, perturb, x, rel.unsqueeze(1).expand_as(x) / 3, target=target,
                n_perturb_samples=10, max_examples_per_batch=3, normalize=True,
            )  # fmt: skip

    theirs_s, theirs = best_time(theirs_run, args.repeat)
    diff = np.abs(np.array(ours["infidelity"])[:, 0] / theirs.numpy() - 1).max()
    report("infidelity", ours_s, "captum", theirs_s, f"largest relative difference {diff:.1e}")

    # ROAD
    a_batch, y = rel.numpy()[:, None], target.numpy()
    ours_s, ours = best_time(
        lambda: cnnscan.evaluate(model, None, attr, ["road"], noise_level=0.0), args.repeat
    )

    def road_run():
        metric = quantus.ROAD(noise=0.0, normalise=False, abs=False, disable_warnings=True)
        return metric(model=wrapped, x_batch=gray.numpy(), y_batch=y, a_batch=a_batch, device="cpu")

    theirs_s, theirs = best_time(road_run, args.repeat)
    agree = np.array(list(theirs.values())) == np.array(ours["road_curve"]["predicted"])[:, 0].mean(
        0
    )
    report("ROAD", ours_s, "quantus", theirs_s, f"shares with the same accuracy {agree.mean():.0%}")

    # sensitivity-n
    black = 0.5  # quantus fills removed pixels with one gray value: cnnscan's substrate too
    fill = model.preprocessing.normalize(torch.full((1, 3, 224, 224), black))[0]
    ours_s, ours = best_time(
        lambda: cnnscan.evaluate(model, None, attr, ["sensitivity_n"], steps=49, substrate=fill),
        args.repeat,
    )

    def sensitivity_run():
        metric = quantus.SensitivityN(
            features_in_step=1024, n_max_percentage=0.8, normalise=False, abs=False,
            perturb_baseline=black, return_aggregate=False, disable_warnings=True,
        )  # fmt: skip
        return metric(model=wrapped, x_batch=gray.numpy(), y_batch=y, a_batch=a_batch, device="cpu")

    theirs_s, theirs = best_time(sensitivity_run, args.repeat)
    diff = np.abs(np.array(ours["sensitivity_n_curve"]["pearson"]) - np.array(theirs)).max()
    report("sensitivity-n", ours_s, "quantus", theirs_s, f"largest difference {diff:.1e}")


if __name__ == "__main__":
    main()
