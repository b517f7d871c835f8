"""The methods of issue 18 that captum has: cnnscan vs captum 0.9, one line per method.

    python benchmarks/bench_captum.py [--repeat 3] [--only deeplift,...]

CPU, 2 threads, three classes. DeepLIFT runs on a random-weight vgg11 at 224 px against
random references (captum cannot hook the default model's ReLU6, which it does not know, nor
its activation module called twice per block); the others on the default model and
sample:chelsea. Both sides get the same options (baseline, feature mask,
noise); captum runs one call per target as documented, at its default batch settings.
Prints the best time of `--repeat`, the speed-up (captum / cnnscan) and the Pearson r of the
maps.
"""

from __future__ import annotations

import argparse
import copy
import os
import warnings
from collections.abc import Callable

import torch
import torchvision
from captum.attr import (
    DeepLift,
    DeepLiftShap,
    FeatureAblation,
    InternalInfluence,
    LayerConductance,
    NoiseTunnel,
    Saliency,
    ShapleyValueSampling,
)
from timing import best_time
from torch import nn

import cnnscan
from cnnscan.layers import unshare

warnings.filterwarnings("ignore")


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    stacked = torch.stack([a.flatten().double(), b.flatten().double()])
    return float(torch.corrcoef(stacked)[0, 1])


class _Copy(nn.Module):
    def forward(self, x):
        return x.clone()


def vgg11_for_captum(model: nn.Module) -> nn.Module:
    """The same function, with a copy of each ReLU's output: captum's hooks on a ReLU and the
    max-pool it feeds share one tensor and do not chain otherwise (tests/test_deeplift.py)."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.Sequential(child, _Copy()))
    return model


def per_target(fn: Callable[[int], torch.Tensor], targets: list[int]) -> torch.Tensor:
    return torch.stack([fn(t) for t in targets], dim=1)


def compare(name: str, ours: Callable, theirs: Callable, repeat: int, reduce=None) -> None:
    ours_s, ours_attr = best_time(ours, repeat)
    theirs_s, theirs_maps = best_time(theirs, repeat)
    maps = ours_attr.maps
    if reduce is not None:
        maps, theirs_maps = reduce(maps), reduce(theirs_maps)
    r = pearson(maps, theirs_maps.detach())
    print(
        f"{name:<22} cnnscan {ours_s:7.3f} s   captum {theirs_s:7.3f} s   "
        f"speed-up {theirs_s / ours_s:5.2f}x   r = {r:.6f}",
        flush=True,
    )


def bench_deeplift(repeat: int) -> None:
    torch.manual_seed(0)
    vgg = torchvision.models.vgg11(weights=None).eval()
    peer = vgg11_for_captum(vgg)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    targets = vgg(x).topk(3).indices[0].tolist()
    refs = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    compare(
        "deeplift",
        lambda: cnnscan.explain(vgg, x, "deeplift", targets=[targets], baseline=refs[:1]),
        lambda: per_target(
            lambda t: DeepLift(peer).attribute(x, baselines=refs[:1], target=t), targets
        ),
        repeat,
    )
    compare(
        "deeplift_shap",
        lambda: cnnscan.explain(vgg, x, "deeplift_shap", targets=[targets], baselines=refs),
        lambda: per_target(
            lambda t: DeepLiftShap(peer).attribute(x, baselines=refs, target=t), targets
        ),
        repeat,
    )


def bench_smoothgrad(repeat: int) -> None:
    """SmoothGrad² and VarGrad, 25 samples: the same noise on both sides (seed 0 is captum
    after torch.manual_seed(0)); captum at its default batch (all samples in one pass)."""
    model = cnnscan.load_model()
    x = model.preprocess("sample:chelsea")
    targets = [p["class_id"] for p in cnnscan.predict(model, x, k=3)[0]]
    sigma = 0.15 * float(x.max() - x.min())
    tunnel = NoiseTunnel(Saliency(model.module))

    def theirs(mode: str) -> torch.Tensor:
        def one(target: int) -> torch.Tensor:
            torch.manual_seed(0)  # the same noise for every target, as cnnscan's
            return tunnel.attribute(
                x, nt_type=mode, nt_samples=25, stdevs=sigma, target=target, abs=False
            )

        return per_target(one, targets)

    for mode in ("smoothgrad_sq", "vargrad"):
        compare(
            f"smoothgrad {mode}",
            lambda mode=mode: cnnscan.explain(
                model, x, "smoothgrad", targets=[targets], kind=mode, seed=0
            ),
            lambda mode=mode: theirs(mode),
            repeat,
        )


def bench_ablation(repeat: int) -> None:
    """50 SLIC superpixels as the feature mask of both; Shapley sampling with 5 orders, the
    same ones (seed 0 is captum after torch.manual_seed(0)). captum at its default
    perturbations_per_eval=1 and at 16."""
    model = cnnscan.load_model()
    x = model.preprocess("sample:chelsea")
    targets = [p["class_id"] for p in cnnscan.predict(model, x, k=3)[0]]
    first = cnnscan.explain(model, x, "feature_ablation", targets=[targets[:1]], segments=50)
    labels = torch.as_tensor(first.extras["segments"][0])
    mask = labels[None, None].expand(1, 3, *labels.shape).contiguous()
    for per_eval in (1, 16):
        compare(
            f"feature_ablation ({per_eval})",
            lambda: cnnscan.explain(
                model, x, "feature_ablation", targets=[targets], segments=labels
            ),
            lambda per_eval=per_eval: per_target(
                lambda t: FeatureAblation(model.module).attribute(
                    x, target=t, feature_mask=mask, perturbations_per_eval=per_eval
                ),
                targets,
            ),
            repeat,
            reduce=lambda maps: maps[..., :1, :, :],
        )

    def shapley(per_eval: int) -> torch.Tensor:
        def one(target: int) -> torch.Tensor:
            torch.manual_seed(0)
            return ShapleyValueSampling(model.module).attribute(
                x, target=target, feature_mask=mask, n_samples=5, perturbations_per_eval=per_eval
            )

        return per_target(one, targets)

    for per_eval in (1, 16):
        compare(
            f"shapley_sampling ({per_eval})",
            lambda: cnnscan.explain(
                model, x, "shapley_sampling", targets=[targets], segments=labels, n_permutations=5
            ),
            lambda per_eval=per_eval: shapley(per_eval),
            1,
            reduce=lambda maps: maps[..., :1, :, :],
        )


def bench_layer(repeat: int) -> None:
    """At the default CAM layer (the head's activation, `_swish@1`; captum hooks a copy in
    which that call is its own module), zero baseline, 50 Gauss-Legendre steps on both sides;
    captum with internal_batch_size=16 (its default, all 51 steps of 3 targets in one batch,
    ran out of this machine's 23 GB)."""
    model = cnnscan.load_model()
    x = model.preprocess("sample:chelsea")
    targets = [p["class_id"] for p in cnnscan.predict(model, x, k=3)[0]]
    peer = unshare(model.module, "_swish", x).eval()
    for name, peer_class in [
        ("layer_conductance", LayerConductance),
        ("internal_influence", InternalInfluence),
    ]:
        compare(
            name,
            lambda name=name: cnnscan.explain(
                model, x, name, targets=[targets], layer="_swish@1", baseline="zero"
            ),
            lambda peer_class=peer_class: per_target(
                lambda t: peer_class(peer, peer._swish.calls[1]).attribute(
                    x, target=t, internal_batch_size=16
                ),
                targets,
            ),
            repeat,
            reduce=lambda maps: maps.sum(dim=-3) if maps.shape[-3] > 1 else maps,
        )


BENCHES = {
    "deeplift": bench_deeplift,
    "smoothgrad": bench_smoothgrad,
    "ablation": bench_ablation,
    "layer": bench_layer,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated benches")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, 2 threads, load {os.getloadavg()}")
    for name in args.only.split(","):
        BENCHES[name](args.repeat)


if __name__ == "__main__":
    main()
