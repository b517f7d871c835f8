"""Guided IG: equal to PAIR saliency 0.2.1's GuidedIG in float64 on random-weight resnet18
(several targets in one call, bounded and unbounded paths) and close on the default model
in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from helpers import pair_guided_ig, pearson

import cnnscan
from cnnscan.errors import MethodError


def test_guided_ig_equals_pair_saliency_in_float64():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval().double()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)).double()
    for max_dist in (0.1, 1.0):
        ours = cnnscan.explain(
            net, x, "guided_ig", targets=[3, 500], n_steps=8, max_dist=max_dist
        ).maps[0]
        for column, target in enumerate((3, 500)):
            theirs = pair_guided_ig(net, x, target, x_steps=8, max_dist=max_dist)
            scale = float(theirs.abs().max())
            torch.testing.assert_close(ours[column], theirs, rtol=1e-6, atol=1e-9 * scale)


@pytest.mark.slow
def test_guided_ig_close_to_pair_saliency_on_the_default_model(default_model, chelsea):
    """In float64: Guided IG's path follows the ranks of the gradients, so float32 rounding
    alone moves it (PAIR in float32 vs PAIR in float64: r = 0.94 at 10 steps)."""
    net = copy.deepcopy(default_model.module).double()
    x = default_model.preprocess(chelsea).double()
    ours = cnnscan.explain(net, x, "guided_ig", targets=[285], n_steps=10).maps[0, 0]
    theirs = pair_guided_ig(net, x, 285, x_steps=10)
    assert pearson(ours, theirs) > 0.99


def test_bad_options_are_refused():
    net = torchvision.models.resnet18(weights=None).eval()
    x = torch.zeros(1, 3, 32, 32)
    for option, match in ({"fraction": 1.5}, "fraction"), ({"max_dist": -1}, "max_dist"):
        with pytest.raises(MethodError, match=match):
            cnnscan.explain(net, x, "guided_ig", **option)
    with pytest.raises(MethodError, match="n_steps"):
        cnnscan.explain(net, x, "guided_ig", n_steps=0)
