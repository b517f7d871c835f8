"""LRP against zennit 0.5.1 (vgg11, vgg11_bn, resnet18, the default model), hand-computed
one-layer examples of each rule, conservation on hand-built nets, and LRP-ε → gradient×input."""

from __future__ import annotations

import copy
import functools
import gc

import pytest
import torch
import torchvision
from helpers import (
    DOMESTIC_CATS,
    RELU6_FORMS,
    RELU_FORMS,
    SmallConvNet,
    batchnorm_eps,
    efficientnet_lite_canonizers,
    zennit_lrp,
)
from torch import nn
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import (
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    MixedComposite,
    NameMapComposite,
)
from zennit.rules import Epsilon as ZennitEpsilon
from zennit.torchvision import ResNetCanonizer

import cnnscan
from cnnscan.errors import MethodError
from cnnscan.lrp import COMPOSITES, AlphaBeta, Composite, Epsilon, Gamma, ZBox
from cnnscan.methods.lrp import input_bounds
from cnnscan.models.preprocessing import Preprocessing

LOW, HIGH = input_bounds(Preprocessing(), torch.zeros(1, 3, 1, 1))
ZENNIT = {  # options: zennit's composite keywords, e.g. zero_params="bias"
    # (the same as epsilon_plus on a network without depthwise convs)
    "epsilon_plus_depthwise": lambda canon, **o: EpsilonPlus(canonizers=canon, **o),
    "epsilon_plus": lambda canon, **o: EpsilonPlus(canonizers=canon, **o),
    "epsilon_gamma_box": lambda canon, **o: EpsilonGammaBox(
        low=LOW, high=HIGH, canonizers=canon, **o
    ),
    "epsilon_alpha2_beta1": lambda canon, **o: EpsilonAlpha2Beta1(canonizers=canon, **o),
    "epsilon_plus_flat": lambda canon, **o: EpsilonPlusFlat(canonizers=canon, **o),
    "epsilon_alpha2_beta1_flat": lambda canon, **o: EpsilonAlpha2Beta1Flat(canonizers=canon, **o),
}
EPSILON_ONLY = Composite({nn.Conv2d: "epsilon", nn.Linear: "epsilon"}, name="epsilon")


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def randomize_batchnorm(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that merging matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, (lo, hi) in zip(
                    (m.running_mean, m.running_var, m.weight, m.bias),
                    ((-0.5, 0.5), (0.5, 2.0), (0.5, 1.5), (-0.2, 0.2)),
                    strict=True,
                ):
                    t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)
    return net


@functools.cache
def torchvision_net(arch: str) -> nn.Module:
    """A random-weight torchvision model, built once per test session (put back any change)."""
    torch.manual_seed(0)
    return randomize_batchnorm(getattr(torchvision.models, arch)(weights=None).eval())


@pytest.fixture(scope="module")
def small_input() -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def compare_with_zennit(
    net, x, composite, canonizers, targets=(3, 7), reference=None, **options
) -> tuple[float, float]:
    """(smallest Pearson r, largest |difference| relative to max |relevance|) over targets;
    `options` go to both (e.g. zero_params); `reference` is a zennit composite to use instead
    of ZENNIT's. zennit's canonizers put the module back."""
    chosen = [list(targets)]
    ours = cnnscan.explain(net, x, "lrp", targets=chosen, composite=composite, **options).maps
    reference = reference or ZENNIT[composite](canonizers, **options)
    theirs = zennit_lrp(net, x, list(targets), reference)
    r = min(pearson(ours[0, t], theirs[0, t]) for t in range(len(targets)))
    diff = max(
        float((ours[0, t] - theirs[0, t]).abs().max() / theirs[0, t].abs().max())
        for t in range(len(targets))
    )
    return r, diff


def assert_matches_zennit(net, x, composite, canonizers, reference=None, **options):
    r, diff = compare_with_zennit(net, x, composite, canonizers, reference=reference, **options)
    assert r > 0.99999 and diff < 1e-3, (composite, r, diff)


# -- differential tests against zennit ---------------------------------------------------
@pytest.mark.parametrize("composite", COMPOSITES)
def test_vgg11_matches_zennit(composite, small_input):
    # measured: r = 1.000000, max |diff| ≤ 2e-7 of a max |relevance| of 3e-4 (float32 noise)
    assert_matches_zennit(torchvision_net("vgg11"), small_input, composite, [])


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"])
def test_zero_params_bias_matches_zennit(composite, small_input):
    # measured: r = 1.000000, max |diff| ≤ 3e-6 of max |relevance|
    assert_matches_zennit(torchvision_net("vgg11"), small_input, composite, [], zero_params="bias")


# zennit's BatchNorm merge leaves x/√(1 + ε) in each BatchNorm; ours merges exactly. With the
# real ε = 1e-5 the maps agree to r > 0.99 (measured: vgg11_bn 0.99942 for ε-plus, 0.99848
# for ε-γ-box; resnet18 ≥ 0.9999); with ε → 0 they agree to float precision.
@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_gamma_box"])
def test_vgg11_bn_matches_zennit_with_its_batchnorm_canonizer(composite, small_input):
    r, _ = compare_with_zennit(
        torchvision_net("vgg11_bn"), small_input, composite, [SequentialMergeBatchNorm()], (3,)
    )
    assert r > 0.99, r
    with batchnorm_eps(torchvision_net("vgg11_bn"), 1e-12) as net:
        assert_matches_zennit(net, small_input, composite, [SequentialMergeBatchNorm()])
        attr = cnnscan.explain(net, small_input, "lrp", targets=[0], composite=composite)
    assert len(attr.extras["merged_batchnorm"]) == 8  # every BatchNorm merged into its conv


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_alpha2_beta1"])
def test_resnet18_matches_zennit_with_its_resnet_canonizer(composite, small_input):
    # zennit needs its canonizer to split the residual sum in proportion to the summands;
    # the gradient × input form gives that for free.
    r, _ = compare_with_zennit(
        torchvision_net("resnet18"), small_input, composite, [ResNetCanonizer()], (3,)
    )
    assert r > 0.99, r
    with batchnorm_eps(torchvision_net("resnet18"), 1e-12) as net:
        assert_matches_zennit(net, small_input, composite, [ResNetCanonizer()])


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_gamma_box"])
def test_default_model_matches_zennit(default_model, small_input, composite):
    # Depthwise convs, Conv2dStaticSamePadding (zero-padded z^B bounds), ReLU6 modules called
    # twice, 49 merged BatchNorms, skip connections. zennit's merge leaves x/√(1+ε) in each
    # BatchNorm (ε = 1e-3 here), which we do not: with ε → 0 both agree exactly.
    net = copy.deepcopy(default_model.module).eval()
    with batchnorm_eps(net, 1e-12):
        assert_matches_zennit(net, small_input, composite, efficientnet_lite_canonizers(net))


def test_the_default_composite_gives_depthwise_convs_epsilon(default_model, small_input):
    # zennit: ε-plus with a name map for the 16 depthwise convs
    net = copy.deepcopy(default_model.module).eval()
    depthwise = tuple(
        name
        for name, module in net.named_modules()
        if isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1
    )
    assert len(depthwise) == 16
    reference = MixedComposite(
        [NameMapComposite([(depthwise, ZennitEpsilon(0.25))]), EpsilonPlus()],
        canonizers=efficientnet_lite_canonizers(net),
    )
    with batchnorm_eps(net, 1e-12):
        assert_matches_zennit(net, small_input, "epsilon_plus_depthwise", [], reference)
        attr = cnnscan.explain(net, small_input, "lrp", targets=[0])
    assert attr.extras["composite"] == "epsilon_plus_depthwise"
    assert {attr.extras["rules"][name] for name in depthwise} == {"epsilon"}
    assert attr.extras["rules"]["_blocks.1._expand_conv"] == "zplus"


# -- hand-computed one-layer examples ----------------------------------------------------
class OneLinear(nn.Module):
    """logit_0 = 0.5·x0 − x1 + 2·x2 + 0.5 on x = (1, 2, −1): logit −3."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [1.0, 1.0, 1.0]]))
            self.fc.bias.copy_(torch.tensor([0.5, 0.0]))

    def forward(self, x):
        return self.fc(x.flatten(1))


X_HAND = torch.tensor([1.0, 2.0, -1.0]).view(1, 3, 1, 1)
HAND = {
    # R = −3 at the output. z⁺ = W⁺x⁺ + b⁺ + W⁻x⁻ = 0.5 + 0.5 + 0 = 1 → R_in = x⁺W⁺·R/z⁺
    "zplus": ("zplus", [-1.5, 0.0, 0.0]),
    # z_neg = W⁻x⁺ + b⁻ + W⁺x⁻ = −2 − 2 = −4: 2·[−1.5, 0, 0] − [0, −2, −2]·(−3/−4)
    "alpha2beta1": ("alpha2beta1", [-3.0, 1.5, 1.5]),
    # y < 0: weights w + γw⁻ on x⁺, w + γw⁺ on x⁻, z = (0.5 − 2.5) + 0.5 − 2.5 = −4
    "gamma": (Gamma(0.25), [0.375, -1.875, -1.875]),
    # z = Wx − W⁺l − W⁻h = −3.5 + 2.5 + 2 = 1 with l = −1, h = 2: (xW − lW⁺ − hW⁻)·R/z
    "zbox": (ZBox(low=-1.0, high=2.0), [-3.0, 0.0, 0.0]),
    # every input gets an equal share of the output's relevance
    "flat": ("flat", [-1.0, -1.0, -1.0]),
    # R_in = xW·R/y (the bias keeps 0.5·(−3)/(−3))
    "epsilon": (Epsilon(1e-9), [0.5, -2.0, -2.0]),
    # shares by squared weights 0.25 : 1 : 4, normalized by Σw² + b² = 5.5
    "wsquare": ("wsquare", [-3 * 0.25 / 5.5, -3 / 5.5, -12 / 5.5]),
}


@pytest.mark.parametrize("case", list(HAND))
def test_rules_on_a_hand_computed_linear_layer(case):
    rule, expected = HAND[case]
    attr = cnnscan.explain(OneLinear(), X_HAND, "lrp", targets=[0], rules={nn.Linear: rule})
    assert attr.extras["rules"] == {"fc": case.replace("alpha2beta1", "alpha_beta")}
    torch.testing.assert_close(attr.maps.flatten(), torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_alpha1_beta0_is_zplus():
    net = Residual().eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    a = cnnscan.explain(net, x, "lrp", targets=[1], rules={nn.Conv2d: "zplus"}).maps
    b = cnnscan.explain(net, x, "lrp", targets=[1], rules={nn.Conv2d: "alpha1beta0"}).maps
    torch.testing.assert_close(a, b)


# -- conservation and the gradient × input limit -------------------------------------------
class Residual(nn.Module):
    """conv+BN (merged), ReLU6 that saturates, maxpool, a residual add, avgpool, linear;
    no biases anywhere (BatchNorm with zero mean and shift), so ε rules conserve."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(8, 8, 1, bias=False)
        self.fc = nn.Linear(8, 4, bias=False)
        with torch.no_grad():
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 3.0)
            self.bn.bias.zero_()

    def forward(self, x):
        x = self.pool(self.act(self.bn(self.conv1(x))))
        x = x + self.conv3(torch.relu(self.conv2(x)))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def test_epsilon_rules_without_biases_conserve_relevance():
    net = Residual().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 4
    with torch.no_grad():
        assert (net.bn(net.conv1(x)) > 6).any(), "ReLU6 must saturate somewhere"
    attr = cnnscan.explain(net, x, "lrp", targets=[0, 2], composite=EPSILON_ONLY)
    assert attr.extras["merged_batchnorm"] == ["conv1+bn"]
    relative = attr.extras["conservation_error_relative"]
    assert relative.shape == (2, 2) and float(relative.max()) < 0.01, relative
    torch.testing.assert_close(attr.extras["relevance_sum"], attr.scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", RELU_FORMS)
def test_epsilon_to_zero_is_gradient_times_input(form):
    net = SmallConvNet(form).eval()
    with torch.no_grad():
        for layer in (net.conv1, net.conv2, net.conv3, net.fc):
            layer.bias.zero_()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    attr = cnnscan.explain(net, x, "lrp", targets=[1, 4], composite=EPSILON_ONLY, epsilon=1e-12)
    reference = copy.deepcopy(net).eval()
    for t, target in enumerate((1, 4)):
        leaf = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(reference(leaf)[:, target].sum(), leaf)
        torch.testing.assert_close(attr.maps[:, t], grad * x, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("form", RELU6_FORMS)
def test_relu6_passes_relevance_through_in_every_form(form):
    # Where ReLU6 saturates its gradient is 0 but LRP passes the relevance on (R_in = R_out).
    net = SmallConvNet(form).eval()
    with torch.no_grad():
        for layer in (net.conv1, net.conv2, net.conv3, net.fc):
            layer.bias.zero_()
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(2)) * 10
    attr = cnnscan.explain(net, x, "lrp", targets=[0, 1, 2], composite=EPSILON_ONLY)
    assert float(attr.extras["conservation_error_relative"].max()) < 0.01


def test_resnet18_conserves_without_biases(small_input):
    net = copy.deepcopy(torchvision_net("resnet18"))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.bias.zero_()
        net.fc.bias.zero_()
    attr = cnnscan.explain(net, small_input, "lrp", targets="top3", composite=EPSILON_ONLY)
    assert len(attr.extras["merged_batchnorm"]) == 20  # 17 convs + 3 downsample convs
    assert float(attr.extras["conservation_error_relative"].max()) < 0.01
    plus = cnnscan.explain(net, small_input, "lrp", targets="top3", composite="epsilon_plus")
    # z⁺ keeps relevance positive through the convs and conserves it as well here
    assert float(plus.extras["conservation_error_relative"].max()) < 0.01


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_alpha2_beta1"])
def test_zero_params_bias_keeps_the_relevance_that_biases_absorb(composite, small_input):
    net = torchvision_net("resnet18")  # BatchNorm shifts and a classifier bias
    kept = cnnscan.explain(net, small_input, "lrp", targets="top3", composite=composite)
    assert float(kept.extras["conservation_error_relative"].min()) > 0.1  # measured 0.26-0.40
    zeroed = cnnscan.explain(
        net, small_input, "lrp", targets="top3", composite=composite, zero_params="bias"
    )
    assert zeroed.extras["zero_params"] == "bias"
    assert float(zeroed.extras["conservation_error_relative"].max()) < 1e-4  # measured 2e-6


def test_zero_params_takes_bias_only():
    with pytest.raises(MethodError, match="zero_params must be 'bias' or None"):
        cnnscan.explain(
            Residual().eval(), torch.randn(1, 3, 8, 8), "lrp", targets=[0], zero_params="weight"
        )


# -- the declarative map ---------------------------------------------------------------------
def test_rules_by_name_and_type_override_the_composite(small_input):
    net = torchvision_net("vgg11")
    mapped = cnnscan.explain(
        net,
        small_input,
        "lrp",
        targets=[5],
        composite="epsilon_plus",
        rules={"features.0": "zbox", nn.Conv2d: Gamma(0.25)},
    )
    reference = cnnscan.explain(net, small_input, "lrp", targets=[5], composite="epsilon_gamma_box")
    torch.testing.assert_close(mapped.maps, reference.maps)
    assert mapped.extras["rules"]["features.0"] == "zbox"
    assert mapped.extras["rules"]["features.3"] == "gamma"
    assert mapped.extras["rules"]["classifier.0"] == "epsilon"
    own = Composite({nn.Conv2d: "gamma", nn.Linear: "epsilon"}, first="zbox", name="mine")
    torch.testing.assert_close(
        cnnscan.explain(net, small_input, "lrp", targets=[5], composite=own).maps, reference.maps
    )


def test_many_targets_share_one_forward():
    counter = {"n": 0}

    class Counting(Residual):
        def forward(self, x):
            counter["n"] += 1
            return super().forward(x)

    net = Counting().eval()
    x = torch.randn(1, 3, 16, 16)
    scan = cnnscan.Scan(net, x, relu_rules=False)
    for targets in ([0], [0, 1, 2, 3]):
        counter["n"] = 0
        cnnscan.explain(net, x, "lrp", targets=targets, scan=scan)
        assert counter["n"] == 1


def test_a_batch_gives_each_images_own_map():
    net = Residual().eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    batch = cnnscan.explain(net, x, "lrp", targets=[1], composite="epsilon_gamma_box").maps
    for i in range(3):
        alone = cnnscan.explain(
            net, x[i : i + 1], "lrp", targets=[1], composite="epsilon_gamma_box"
        )
        torch.testing.assert_close(batch[i], alone.maps[0], rtol=1e-5, atol=1e-7)


# -- the default model -------------------------------------------------------------------------
def test_default_model_top5_on_chelsea(default_model, chelsea):
    attr = cnnscan.explain(
        default_model, chelsea, "lrp", targets="top5", composite="epsilon_gamma_box"
    )
    assert attr.maps.shape == (1, 5, 3, 224, 224)
    assert int(attr.targets[0, 0]) in DOMESTIC_CATS
    assert torch.isfinite(attr.maps).all()
    assert attr.extras["rules"]["_conv_stem"] == "zbox"
    assert len(attr.extras["merged_batchnorm"]) == 49
    assert attr.extras["conservation_error"].shape == (1, 5)
    # the cat's relevance lies mostly on the cat: the centre half holds more than its area
    energy = attr.maps[0, 0].sum(dim=0).clamp(min=0)
    centre = energy[56:168, 56:168].sum() / energy.sum()
    assert float(centre) > 0.25


# -- bad input ------------------------------------------------------------------------------------
class WithGroupNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).mean(dim=(2, 3)))


def test_a_layer_without_a_rule_is_named_with_its_type_and_the_fix():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(MethodError, match=r"'norm' of type GroupNorm.*rules=\{'norm'"):
        cnnscan.explain(WithGroupNorm(), x, "lrp", targets=[0])
    attr = cnnscan.explain(WithGroupNorm(), x, "lrp", targets=[0], rules={"norm": "pass"})
    assert attr.extras["rules"]["norm"] == "pass"


class Scaled(nn.Module):
    """A parameter used in a plain multiplication."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc((self.conv(x) * self.scale).mean(dim=(2, 3)))


def test_a_parameter_used_outside_a_layer_is_named():
    with pytest.raises(MethodError, match=r"type Scaled .*`mul`"):
        cnnscan.explain(Scaled(), torch.randn(1, 3, 8, 8), "lrp", targets=[0])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"composite": "epsilon_pluss"},
            r"Did you mean: epsilon_plus.*Composites: epsilon_plus_depthwise, epsilon_plus,",
        ),
        ({"rules": {nn.Conv2d: "zplsu"}}, r"unknown LRP rule 'zplsu'.*Rules: epsilon, gamma"),
        ({"rules": {"conv9": "epsilon"}}, r"layer 'conv9'.*Did you mean: .*conv1"),
        ({"rules": {3: "epsilon"}}, r"keyed by a module name"),
        ({"rules": {"conv2": "zbox"}}, r"zbox rule .*only fits the layer that reads the image"),
        ({"composite": 3}, r"composite must be a name"),
        ({"epsilon": -1}, r"epsilon must be a number >= 0"),
    ],
)
def test_bad_options_say_what_is_valid(options, message):
    with pytest.raises(MethodError, match=message):
        cnnscan.explain(Residual().eval(), torch.randn(1, 3, 8, 8), "lrp", targets=[0], **options)


def test_rule_objects_check_their_parameters():
    with pytest.raises(MethodError, match="alpha - beta must be 1"):
        AlphaBeta(1.0, 1.0)
    with pytest.raises(MethodError, match="gamma must be a number >= 0"):
        Gamma(-0.5)


def test_signed_view_keeps_zero_grey_for_a_map_without_negatives():
    # z⁺ relevance is often all ≥ 0: zero must still be the diverging map's centre.
    maps = torch.zeros(1, 1, 3, 4, 4)
    maps[..., 1, 1] = 1.0
    attr = cnnscan.Attribution(maps, torch.zeros(1, 1, dtype=torch.long), "lrp", maps[:, 0])
    picture = attr.image(0, 0, "signed")
    assert abs(int(picture[0, 0, 0]) - int(picture[0, 0, 2])) < 5  # grey, not blue
    red, green, blue = picture[1, 1].astype(int)
    assert red > 2 * blue and red > 2 * green  # red


def test_the_graph_is_freed_without_waiting_for_the_garbage_collector():
    # A layer's rule must not hold the layer's output (output -> grad_fn -> rule -> output
    # would be a cycle that keeps every activation alive until a gc pass, or longer).
    from cnnscan.lrp.tracer import _Plan

    net = Residual().eval()
    gc.collect()
    gc.disable()
    try:
        cnnscan.explain(net, torch.randn(1, 3, 16, 16), "lrp", targets=[0, 1])
        alive = sum(type(obj) is _Plan for obj in gc.get_objects())
    finally:
        gc.enable()
    assert alive == 0


class ChangesAnInputLater(nn.Module):
    """conv2 reads h, then h is modified in place: conv2's rule can no longer see its input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv1(x)
        y = self.conv2(h)
        h.add_(1.0)
        return self.fc((y + h).mean(dim=(2, 3)))


def test_an_input_changed_in_place_after_its_layer_is_an_error_not_a_wrong_map():
    with pytest.raises(MethodError, match=r"input of layer 'conv2' was modified in place"):
        cnnscan.explain(ChangesAnInputLater(), torch.randn(1, 3, 8, 8), "lrp", targets=[0])
