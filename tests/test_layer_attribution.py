"""Layer conductance and internal influence: equal to captum 0.9's LayerConductance and
InternalInfluence (same layer, baseline, steps and rule) in float64 on random-weight resnet18
and vgg11, close on the default model (float32, BatchNorm folded nowhere: the same forward);
conductance's units sum to f(x) − f(x′) as the steps grow."""

from __future__ import annotations

import pytest
import torch
import torchvision
from captum.attr import InternalInfluence, LayerConductance
from helpers import SmoothConvNet, pearson

import cnnscan
from cnnscan.errors import MethodError

X64 = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)).double()
CAPTUM = {"layer_conductance": LayerConductance, "internal_influence": InternalInfluence}


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).eval().double()
    vgg = torchvision.models.vgg11(weights=None).eval().double()
    return {"resnet18": (resnet, resnet.layer3, "layer3"), "vgg11": (vgg, vgg.features, "features")}


@pytest.mark.parametrize("method", list(CAPTUM))
@pytest.mark.parametrize("arch", ["resnet18", pytest.param("vgg11", marks=pytest.mark.slow)])
def test_equal_to_captum_in_float64(nets, arch, method):
    net, module, name = nets[arch]
    for target, rule in [(3, "gausslegendre"), (500, "riemann_trapezoid")]:
        ours = cnnscan.explain(
            net, X64, method, targets=[target], layer=name, baseline="zero", n_steps=8, rule=rule
        )
        theirs = CAPTUM[method](net, module).attribute(X64, target=target, n_steps=8, method=rule)
        if method == "internal_influence" and rule == "riemann_trapezoid":
            theirs = theirs * 8 / 7  # captum's trapezoid weights sum to (n − 1)/n (gradient.md)
        scale = float(theirs.abs().max())  # captum's quadrature weights are float32
        torch.testing.assert_close(
            ours.extras["units"][0, 0], theirs[0], rtol=1e-6, atol=1e-7 * scale
        )
        torch.testing.assert_close(ours.maps[0, 0, 0], ours.extras["units"][0, 0].sum(0))
        assert ours.layer == name


@pytest.mark.slow
def test_close_to_captum_on_the_default_model(cam_default):
    model, x, peer, module, name = cam_default
    for method in CAPTUM:
        ours = cnnscan.explain(
            model, x, method, targets=[285], layer=name, baseline="zero", n_steps=8
        )
        theirs = CAPTUM[method](peer, module).attribute(x, target=285, n_steps=8)
        assert pearson(ours.extras["units"][0, 0], theirs[0].detach()) > 0.99, method


def test_conductance_sums_to_the_logit_difference_as_the_steps_grow():
    net = SmoothConvNet().double()
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(4)).double()
    errors = [
        float(
            cnnscan.explain(
                net,
                x,
                "layer_conductance",
                targets=[1],
                layer="conv2",
                baseline="zero",
                n_steps=steps,
                rule="riemann_trapezoid",
            )
            .extras["completeness_error_relative"]
            .max()
        )
        for steps in (4, 64)
    ]
    assert errors[1] < 1e-3 < errors[0] or errors[1] < errors[0] / 10


def test_bad_options_are_refused(nets):
    net, _, _ = nets["resnet18"]
    with pytest.raises(MethodError, match="n_steps"):
        cnnscan.explain(net, X64, "layer_conductance", layer="layer3", n_steps=0)
    with pytest.raises(MethodError, match="rule"):
        cnnscan.explain(net, X64, "internal_influence", layer="layer3", rule="simpson")
