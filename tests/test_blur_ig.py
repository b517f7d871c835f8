"""Blur IG: equal to PAIR saliency 0.2.1's BlurIG (the same σ steps, both spacings) in float64
on random-weight resnet18 and vgg11, and close on the default model."""

from __future__ import annotations

import numpy as np
import pytest
import saliency.core as pair
import torch
import torchvision
from helpers import pearson

import cnnscan
from cnnscan.errors import MethodError


def pair_blur_ig(module, x: torch.Tensor, target: int, **options) -> torch.Tensor:
    """PAIR's BlurIG on one image (it works in H, W, C), back as (3, H, W)."""

    def call(batch, call_model_args=None, expected_keys=None):
        t = torch.tensor(np.asarray(batch)).permute(0, 3, 1, 2).requires_grad_(True)
        (grad,) = torch.autograd.grad(module(t)[:, target].sum(), t)
        return {pair.base.INPUT_OUTPUT_GRADIENTS: grad.permute(0, 2, 3, 1).numpy()}

    mask = pair.BlurIG().GetMask(x[0].permute(1, 2, 0).detach().numpy(), call, **options)
    return torch.from_numpy(mask).permute(2, 0, 1)


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("vgg11", marks=pytest.mark.slow)])
def test_blur_ig_equals_pair_saliency_in_float64(arch):
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None).eval().double()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)).double()
    for target, sqrt in [(3, False), (500, True)]:
        ours = cnnscan.explain(
            net, x, "blur_ig", targets=[target], max_sigma=8, n_steps=10, sqrt=sqrt
        ).maps[0, 0]
        theirs = pair_blur_ig(net, x, target, max_sigma=8, steps=10, sqrt=sqrt)
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12 * float(theirs.abs().max()))


@pytest.mark.slow
def test_blur_ig_close_to_pair_saliency_on_the_default_model(default_model, chelsea):
    x = default_model.preprocess(chelsea)
    ours = cnnscan.explain(default_model, x, "blur_ig", targets=[285], n_steps=8).maps[0, 0]
    theirs = pair_blur_ig(default_model.module, x, 285, steps=8)
    assert pearson(ours, theirs) > 0.99


def test_bad_options_are_refused():
    net = torchvision.models.resnet18(weights=None).eval()
    with pytest.raises(MethodError, match="max_sigma"):
        cnnscan.explain(net, torch.zeros(1, 3, 32, 32), "blur_ig", max_sigma=0)
