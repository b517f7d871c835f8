"""Concepts (CRP): channel relevances against zennit-crp 0.6.0 and plain autograd, the
conservation of conditional heatmaps, and the ablation check on the default model."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from helpers import assert_unchanged, pearson, snapshot
from torch import nn

import cnnscan
from cnnscan.errors import LayerError, MethodError

LAYER = "features.14"  # vgg11: the ReLU after the 6th conv, 512 channels


@functools.cache
def vgg() -> nn.Module:
    """A random-weight vgg11 (built once; tests never change it)."""
    torch.manual_seed(0)
    return torchvision.models.vgg11(weights=None).eval()


@pytest.fixture(scope="module")
def small() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.mark.slow
def test_concepts_match_zennit_crp(small):
    """Channel relevances and each concept's conditional heatmap equal zennit-crp's
    `CondAttribution` with the same composite (ε-plus) and conditions."""
    crp = pytest.importorskip("crp.attribution")
    from zennit.composites import EpsilonPlus

    target = 3
    ours = cnnscan.concepts(vgg(), small, [target], layer=LAYER, composite="epsilon_plus")[0]
    reference = crp.CondAttribution(vgg_copy())
    x = small.clone().requires_grad_(True)
    whole = reference(x, [{"y": [target]}], EpsilonPlus(), record_layer=[LAYER])
    theirs = whole.relevances[LAYER][0].sum(dim=(1, 2))
    assert torch.allclose(ours.channels, theirs, rtol=1e-4, atol=1e-6 * theirs.abs().max())
    channels = [concept.channel for concept in ours.concepts]
    assert channels == theirs.argsort(descending=True)[: len(channels)].tolist()
    conditions = [{"y": [target], LAYER: [c]} for c in channels]
    maps = reference(x, conditions, EpsilonPlus()).heatmap
    for concept, theirs_map in zip(ours.concepts, maps, strict=True):
        assert pearson(concept.heatmap, theirs_map) > 0.9999, concept.channel
        error = (concept.heatmap - theirs_map).abs().max() / theirs_map.abs().max()
        assert error < 1e-4, (concept.channel, float(error))


def vgg_copy() -> nn.Module:
    """zennit-crp switches off the parameters' gradients of the model it is given."""
    clone = torchvision.models.vgg11(weights=None).eval()
    clone.load_state_dict(vgg().state_dict())
    return clone


@pytest.mark.parametrize(
    "method", [pytest.param("lrp", marks=pytest.mark.slow), "gradient_x_activation"]
)
def test_all_conditional_heatmaps_sum_to_the_unconditional_one(small, method):
    """With every channel as a concept, the conditional heatmaps add up to the method's
    unconditional heatmap (LRP, or gradient × input), and the channels' relevances to the
    layer total."""
    layer = "features.7"  # 256 channels at 4×4
    found = cnnscan.concepts(vgg(), small, [5], layer=layer, top=256, method=method, check=False)
    target = found[0]
    assert len(target.concepts) == 256
    total = sum(concept.heatmap for concept in target.concepts)
    if method == "lrp":
        whole = cnnscan.explain(vgg(), small, "lrp", targets=[5]).maps[0, 0].sum(dim=0)
    else:
        x = small.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(vgg()(x)[0, 5], x)
        whole = (x * grad)[0].detach().sum(dim=0)
    assert torch.allclose(total, whole, atol=1e-5 * float(whole.abs().max()))
    assert float(target.channels.sum()) == pytest.approx(target.layer_total, rel=1e-5)
    shares = sum(concept.share for concept in target.concepts)
    assert shares == pytest.approx(1.0, abs=1e-4)


def test_gradient_x_activation_relevance_is_activation_times_gradient(small):
    """Each channel's relevance is Σ activation × ∂logit/∂activation over its positions."""
    found = cnnscan.concepts(
        vgg(), small, [1], layer=LAYER, method="gradient_x_activation", check=False
    )[0]
    recorded = {}
    handle = vgg().features[14].register_forward_hook(lambda m, i, o: recorded.update(out=o))
    try:
        logits = vgg()(small.clone().requires_grad_(True))
        (grad,) = torch.autograd.grad(logits[0, 1], recorded["out"])
    finally:
        handle.remove()
    expected = (recorded["out"] * grad)[0].detach().sum(dim=(1, 2))
    assert torch.allclose(found.channels, expected, rtol=1e-4, atol=1e-7)
    assert found.layer_total == pytest.approx(float(expected.sum()), rel=1e-4)
    ranked = [concept.channel for concept in found.concepts]
    assert ranked == expected.argsort(descending=True)[:6].tolist()


@pytest.mark.slow
def test_zeroing_the_top_concepts_lowers_the_cat_logit_more_than_random_ones(
    default_model, chelsea
):
    """The faithfulness check on the bundled model and the cat: the three most relevant
    channels of the last block matter more to the logit than any of 20 random triples."""
    before = snapshot(default_model.module)
    found = cnnscan.concepts(default_model, chelsea, top=3)
    assert_unchanged(before, default_model.module)
    target = found[0]
    assert found.layer == "_swish@1" and found.shape == (1280, 7, 7)
    check = target.ablation
    assert check is not None and check.channels == [c.channel for c in target.concepts]
    assert check.top > max(check.random), (check.top, check.random)
    # the same check done by hand: zero the channels at the layer with a forward hook
    module = default_model.module
    calls = []

    def zero(_module, _inputs, output):
        calls.append(1)
        if len(calls) == 2:  # the second call of the shared `_swish`: the last block
            output = output.clone()
            output[:, check.channels] = 0
        return output

    x = default_model.inputs(chelsea)
    with torch.no_grad():
        plain = module(x)[0, target.class_id]
        handle = module._swish.register_forward_hook(zero)
        try:
            zeroed = module(x)[0, target.class_id]
        finally:
            handle.remove()
    assert float(plain - zeroed) == pytest.approx(check.top, rel=1e-3, abs=1e-4)


def test_bad_requests_are_one_line_errors(small):
    with pytest.raises(MethodError, match="method must be one of"):
        cnnscan.concepts(vgg(), small, layer=LAYER, method="occlusion")
    with pytest.raises(LayerError, match="no layer named"):
        cnnscan.concepts(vgg(), small, layer="features.99")
    with pytest.raises(LayerError, match="channels, height, width"):
        cnnscan.concepts(vgg(), small, layer="classifier.0")
    with pytest.raises(MethodError, match="one image at a time"):
        cnnscan.concepts(vgg(), torch.cat([small, small]), layer=LAYER)
    with pytest.raises(MethodError, match="top"):
        cnnscan.concepts(vgg(), small, layer=LAYER, top=0)
