"""DeepLIFT and DeepLIFT-SHAP: equal to captum 0.9's DeepLift / DeepLiftShap in float64 on
random-weight vgg11 and resnet18 and on a net of every nonlinearity captum knows; summation
to delta on the default model; every ReLU form gives the same map.

captum hooks modules, so it gets a copy of each model that computes the same function:
resnet's blocks call one ReLU module per call (captum cannot hook a module used twice), and
every ReLU hands on a copy of its output. Without that copy, where a nonlinear module feeds
another directly (ReLU → max-pool in vgg and resnet's stem), captum's result leaves the chain
rule of multipliers (a hand-computed test below shows it; with the copy captum agrees
exactly). Where windows of a max-pool overlap (resnet's stem), captum's `max_unpool` keeps one
window's share and loses summation to delta; cnnscan sums them. Against a constant reference
(the zero image: its feature maps are bias only) the pooling rule is the plain gradient, and
captum without the copies agrees on resnet18 exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import DeepLift, DeepLiftShap
from helpers import RELU_FORMS, SmallConvNet, SmoothConvNet
from torch import nn

import cnnscan
from cnnscan.errors import MethodError

X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).double()
TARGETS = torch.tensor([[3, 7], [7, 500]])


class EveryNonlinearity(nn.Module):
    """Each nonlinearity captum's DeepLift knows, each after a convolution."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1) for i in range(6))
        self.acts = nn.ModuleList(
            [nn.ELU(), nn.Tanh(), nn.MaxPool2d(2), nn.LeakyReLU(0.1), nn.Sigmoid(), nn.Softplus()]
        )
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, x):
        for conv, act in zip(self.convs, self.acts, strict=True):
            x = act(conv(x))
        return self.fc(x.mean(dim=(2, 3)))


class _BlockWithTwoRelus(nn.Module):
    """torchvision's BasicBlock computed with one ReLU module per call."""

    def __init__(self, block: torchvision.models.resnet.BasicBlock):
        super().__init__()
        self.block, self.relu2 = block, nn.ReLU()

    def forward(self, x):
        b = self.block
        out = b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x)))))
        return self.relu2(out + (x if b.downsample is None else b.downsample(x)))


class _Copy(nn.Module):
    def forward(self, x):
        return x.clone()


def for_captum(model: nn.Module, copies: bool = True) -> nn.Module:
    """A copy of the model, the same function, that captum's DeepLift hooks correctly: one
    ReLU module per call in resnet's blocks, and (`copies`) a copy of every ReLU's output."""
    model = copy.deepcopy(model)
    for stage in [getattr(model, f"layer{i}", []) for i in range(1, 5)]:
        for i, block in enumerate(stage):
            stage[i] = _BlockWithTwoRelus(block)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if copies and isinstance(child, nn.ReLU):
                setattr(parent, name, nn.Sequential(child, _Copy()))
    return model


@pytest.fixture(scope="module")
def vgg11():
    torch.manual_seed(0)
    return torchvision.models.vgg11(weights=None).eval().double()


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval().double()


def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(
        ours, theirs.detach(), rtol=1e-9, atol=1e-12 * float(theirs.abs().max())
    )


def _captum(module, x, targets, method=DeepLift, baselines=None):
    baselines = torch.zeros_like(x) if baselines is None else baselines
    return torch.stack(
        [
            method(module).attribute(x, baselines=baselines, target=targets[:, t])
            for t in range(targets.shape[1])
        ],
        dim=1,
    )


@pytest.mark.parametrize(
    "arch",
    [
        pytest.param("vgg11", marks=pytest.mark.slow),
        pytest.param("resnet18", marks=pytest.mark.slow),
        "every_nonlinearity",
    ],
)
def test_deeplift_equals_captum_in_float64(arch, request):
    if arch == "every_nonlinearity":
        model, x, targets = EveryNonlinearity().double(), X64[:, :, :16, :16], TARGETS % 4
    else:
        model, x, targets = request.getfixturevalue(arch), X64, TARGETS
    baseline = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).double()
    peer = for_captum(model)
    if arch == "resnet18":  # overlapping pooling windows: a constant reference (see above)
        baseline, peer = torch.zeros_like(x), for_captum(model, copies=False)
    ours = cnnscan.explain(model, x, "deeplift", targets=targets, baseline=baseline)
    close(ours.maps, _captum(peer, x, targets, baselines=baseline))
    assert float(ours.extras["completeness_error_relative"].max()) < 1e-9


@pytest.mark.parametrize(
    "arch", [pytest.param("vgg11", marks=pytest.mark.slow), "every_nonlinearity"]
)
def test_deeplift_shap_equals_captum_in_float64(arch, request):
    if arch == "every_nonlinearity":
        model, x, targets = EveryNonlinearity().double(), X64[:, :, :16, :16], TARGETS % 4
    else:
        model, x, targets = request.getfixturevalue(arch), X64, TARGETS
    refs = torch.randn((3, *x.shape[1:]), generator=torch.Generator().manual_seed(5)).double()
    ours = cnnscan.explain(model, x, "deeplift_shap", targets=targets, baselines=refs)
    close(ours.maps, _captum(for_captum(model), x, targets, DeepLiftShap, refs))
    assert ours.extras["n_baselines"] == 3
    assert float(ours.extras["completeness_error_relative"].max()) < 1e-9


def test_two_nonlinearities_in_a_row_follow_the_chain_rule_of_multipliers():
    """conv -> tanh -> max-pool -> conv -> fc computed by hand: the multiplier of the pooling
    (captum's rule) times tanh's Δout/Δin. captum on the module as it is leaves this chain
    (by a few percent of the map); cnnscan equals the hand computation, as does captum given
    a copy between the two."""
    torch.manual_seed(0)
    conv1, conv2, fc = (
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Linear(64, 3),
    )
    net = nn.Sequential(conv1, nn.Tanh(), nn.MaxPool2d(2), conv2, nn.Flatten(), fc).double()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)).double()
    ref = torch.zeros_like(x)
    with torch.no_grad():
        h, h_ref = conv1(x), conv1(ref)
        a, a_ref = h.tanh(), h_ref.tanh()
        p, idx = F.max_pool2d(a, 2, return_indices=True)
        p_ref, idx_ref = F.max_pool2d(a_ref, 2, return_indices=True)
    pooled = p.clone().requires_grad_(True)
    (g_p,) = torch.autograd.grad(fc(conv2(pooled).flatten(1))[0, 1], pooled)
    top = torch.maximum(p, p_ref)
    moved = F.max_unpool2d(g_p * (top - p_ref), idx, 2, output_size=(8, 8)) + F.max_unpool2d(
        g_p * (p - top), idx_ref, 2, output_size=(8, 8)
    )
    g_h = moved / (h - h_ref)  # (moved / Δa) · (Δa / Δh)
    xx = x.clone().requires_grad_(True)
    (g_x,) = torch.autograd.grad(conv1(xx), xx, g_h)
    expected = g_x * (x - ref)
    ours = cnnscan.explain(net, x, "deeplift", targets=[1], baseline="zero").maps[:, 0]
    close(ours, expected)
    theirs = DeepLift(net).attribute(x, baselines=ref, target=1)
    assert float((theirs - expected).abs().max()) > 1e-3 * float(expected.abs().max())
    copied = nn.Sequential(conv1, nn.Tanh(), _Copy(), nn.MaxPool2d(2), conv2, nn.Flatten(), fc)
    close(DeepLift(copied.double()).attribute(x, baselines=ref, target=1), expected)


def test_overlapping_pooling_windows_keep_summation_to_delta():
    """resnet's 3×3 stride-2 max-pool: a position can be the argmax of several windows. Their
    shares are summed, so Σ attributions = f(x) − f(x′); captum's max_unpool keeps one share
    and misses the sum by a fifth of it here."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Flatten(),
        nn.Linear(64, 3),
    ).double()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)).double()
    ours = cnnscan.explain(net, x, "deeplift", targets=[1], baseline="zero")
    assert float(ours.extras["completeness_error_relative"].max()) < 1e-9
    _, delta = DeepLift(net).attribute(
        x, baselines=torch.zeros_like(x), target=1, return_convergence_delta=True
    )
    assert float((delta.abs() / ours.extras["delta"][:, 0].abs()).max()) > 0.01


@pytest.mark.slow
def test_deeplift_sums_to_the_logit_difference_on_the_default_model(default_model, chelsea):
    """Summation to delta, exact up to float32 rounding; Integrated Gradients at 50 steps
    misses it by percents on the same model."""
    for method in ("deeplift", "deeplift_shap"):
        attr = cnnscan.explain(default_model, chelsea, method, targets="top3")
        assert float(attr.extras["completeness_error_relative"].max()) < 1e-4, method
        assert float(attr.extras["delta"].abs().min()) > 0.1, method


def test_every_relu_form_gives_the_same_deeplift():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    maps = [
        cnnscan.explain(SmallConvNet(form), x, "deeplift", targets=[[0, 2], [1, 3]]).maps
        for form in RELU_FORMS
    ]
    for other in maps[1:]:
        torch.testing.assert_close(other, maps[0])


def test_deeplift_of_a_smooth_net_sums_to_delta_and_differs_from_its_gradient():
    net, x = (
        SmoothConvNet().double(),
        torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(4)),
    )
    attr = cnnscan.explain(net, x.double(), "deeplift", targets=[2], baseline="zero")
    grad_x = cnnscan.explain(net, x.double(), "gradient_x_input", targets=[2]).maps
    assert float(attr.extras["completeness_error_relative"].max()) < 1e-9
    assert not torch.allclose(attr.maps, grad_x)


def test_bad_baselines_are_refused():
    net, x = SmallConvNet(), torch.randn(1, 3, 16, 16)
    with pytest.raises(MethodError, match="baseline"):
        cnnscan.explain(net, x, "deeplift", baseline="nope")
    with pytest.raises(MethodError, match="baselines is empty"):
        cnnscan.explain(net, x, "deeplift_shap", baselines=())
