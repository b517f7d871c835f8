"""Feature ablation and Shapley value sampling over superpixels: equal to captum 0.9's
FeatureAblation and ShapleyValueSampling with the same feature mask (and, for sampling, the
same orders: `seed=s` is captum after torch.manual_seed(s)) on random-weight resnet18 and
vgg11 in float64 and on the default model; efficiency of the sampled Shapley values."""

from __future__ import annotations

import pytest
import torch
import torchvision
from captum.attr import FeatureAblation, ShapleyValueSampling

import cnnscan
from cnnscan.errors import MethodError

X64 = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)).double()
BLOCKS = torch.arange(64)[:, None] // 16 * 4 + torch.arange(64)[None, :] // 16  # 16 squares


def captum_mask(labels: torch.Tensor) -> torch.Tensor:
    return labels[None, None].expand(1, 3, *labels.shape).contiguous()


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {
        "resnet18": torchvision.models.resnet18(weights=None).eval().double(),
        "vgg11": torchvision.models.vgg11(weights=None).eval().double(),
    }


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("vgg11", marks=pytest.mark.slow)])
def test_feature_ablation_equals_captum(nets, arch):
    net = nets[arch]
    for target in (3, 500):
        ours = cnnscan.explain(net, X64, "feature_ablation", targets=[target], segments=BLOCKS)
        theirs = FeatureAblation(net).attribute(
            X64, target=target, feature_mask=captum_mask(BLOCKS)
        )
        torch.testing.assert_close(ours.maps[0, 0], theirs[0, :1], rtol=1e-9, atol=1e-12)
        assert ours.extras["forwards"] == 16


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("vgg11", marks=pytest.mark.slow)])
def test_shapley_sampling_equals_captum_with_the_same_orders(nets, arch):
    net = nets[arch]
    for target in (3, 500):
        ours = cnnscan.explain(
            net, X64, "shapley_sampling", targets=[target], segments=BLOCKS, n_permutations=4
        )
        torch.manual_seed(0)
        theirs = ShapleyValueSampling(net).attribute(
            X64, target=target, feature_mask=captum_mask(BLOCKS), n_samples=4
        )
        scale = float(theirs.abs().max())  # captum sums the gains in float32
        theirs = theirs[0, :1].double()
        torch.testing.assert_close(ours.maps[0, 0], theirs, rtol=1e-6, atol=1e-6 * scale)
        # efficiency: Σφ = f(x) − f(fill) for any number of orders
        assert float(ours.extras["sum_error"].abs().max()) < 1e-9 * scale


@pytest.mark.slow
def test_both_equal_captum_on_the_default_model_with_slic_superpixels(default_model, chelsea):
    """float32, BatchNorm folded on our side: equal up to rounding."""
    x = default_model.preprocess(chelsea)
    attr = cnnscan.explain(default_model, x, "feature_ablation", targets=[285], segments=30)
    labels = torch.as_tensor(attr.extras["segments"][0])
    theirs = FeatureAblation(default_model.module).attribute(
        x, target=285, feature_mask=captum_mask(labels)
    )
    torch.testing.assert_close(attr.maps[0, 0], theirs[0, :1], rtol=1e-3, atol=1e-3)
    ours = cnnscan.explain(
        default_model, x, "shapley_sampling", targets=[285], segments=labels, n_permutations=2
    )
    torch.manual_seed(0)
    theirs = ShapleyValueSampling(default_model.module).attribute(
        x, target=285, feature_mask=captum_mask(labels), n_samples=2
    )
    torch.testing.assert_close(ours.maps[0, 0], theirs[0, :1].float(), rtol=1e-3, atol=1e-3)


def test_bad_options_are_refused(nets):
    with pytest.raises(MethodError, match="n_permutations"):
        cnnscan.explain(nets["resnet18"], X64, "shapley_sampling", n_permutations=0)
    with pytest.raises(MethodError, match="fill"):
        cnnscan.explain(nets["resnet18"], X64, "feature_ablation", fill="nope")
