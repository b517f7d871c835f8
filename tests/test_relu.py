"""Switchable ReLU rules: every way of calling ReLU gets the same guided / deconv backward."""

import pytest
import torch
from helpers import RELU6_FORMS, RELU_FORMS, SmallConvNet

import cnnscan
from cnnscan.engine.relu_rules import RuleSwitch, switchable_relus

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def rule_gradients(net, rules=("standard", "guided", "deconv")):
    x = X.clone().requires_grad_(True)
    with switchable_relus() as switch:
        out = net(x)
    result = {}
    for rule in rules:
        with switch.use(rule):
            (result[rule],) = torch.autograd.grad(out[:, 1].sum(), x, retain_graph=True)
    return result


@pytest.mark.parametrize("forms", [RELU_FORMS, RELU6_FORMS])
def test_every_relu_form_gives_identical_maps(forms):
    reference = rule_gradients(SmallConvNet(forms[0]))
    for form in forms[1:]:
        got = rule_gradients(SmallConvNet(form))
        for rule, expected in reference.items():
            torch.testing.assert_close(got[rule], expected, rtol=0, atol=0, msg=f"{form} {rule}")


@pytest.mark.parametrize("form", RELU_FORMS + RELU6_FORMS)
def test_standard_rule_is_plain_autograd(form):
    net = SmallConvNet(form)
    x = X.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(net(x)[:, 1].sum(), x)
    torch.testing.assert_close(rule_gradients(net, ["standard"])["standard"], expected)


def test_guided_and_deconv_rules_by_hand():
    """One ReLU: guided = relu(g)·1[x>0], deconv = relu(g); ReLU6 masks 0 < x < 6."""
    x = torch.tensor([-1.0, 0.5, 2.0, 7.0], requires_grad=True)
    grad_out = torch.tensor([1.0, -1.0, 2.0, 3.0])
    for fn, mask in [(torch.relu, [0, 1, 1, 1]), (torch.nn.functional.relu6, [0, 1, 1, 0])]:
        with switchable_relus() as switch:
            y = fn(x)
        mask = torch.tensor(mask, dtype=torch.float)
        expected = {
            "standard": grad_out * mask,
            "guided": grad_out.clamp(min=0) * mask,
            "deconv": grad_out.clamp(min=0),
        }
        for rule, want in expected.items():
            with switch.use(rule):
                (got,) = torch.autograd.grad(y, x, grad_out, retain_graph=True)
            torch.testing.assert_close(got, want)


def test_inplace_relu_still_modifies_its_input():
    x = torch.tensor([-1.0, 2.0])
    with switchable_relus():
        y = x.relu_()
    assert y is x and x.tolist() == [0.0, 2.0]


def test_hardtanh_that_is_not_a_relu_is_left_alone():
    x = torch.tensor([-2.0, -0.5, 0.5], requires_grad=True)
    with switchable_relus() as switch, switch.use("deconv"):
        y = torch.nn.functional.hardtanh(x)
        (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad.tolist() == [0.0, 1.0, 1.0]


def test_unknown_rule_is_rejected():
    with pytest.raises(ValueError, match="unknown ReLU rule"), RuleSwitch().use("nope"):
        pass


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
def test_methods_agree_across_relu_forms(method):
    maps = [
        cnnscan.explain(SmallConvNet(form), X, method, targets=[0, 3]).maps for form in RELU_FORMS
    ]
    for other in maps[1:]:
        torch.testing.assert_close(other, maps[0], rtol=0, atol=0)
