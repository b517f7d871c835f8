"""Extremal perturbation and excitation backprop: equal to torchray 1.0.0.2's implementations
(which import unchanged with this torch) on random-weight torchvision nets, all targets of an
image in one call against torchray's one call per target."""

from __future__ import annotations

import pytest
import torch
import torchvision

import cnnscan
from cnnscan.errors import MethodError
from cnnscan.methods.extremal import SmoothMasks, area_loss

ebp = pytest.importorskip("torchray.attribution.excitation_backprop")
ep = pytest.importorskip("torchray.attribution.extremal_perturbation")


def _net(arch: str, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None).eval().to(dtype)
    if arch.startswith("resnet"):  # torchray's proportional split of the skip sums
        ebp.update_resnet(net)
    return net


def _image(size: int = 64, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dtype)


# (arch, saliency layer, the classifier's input: torchray's contrast layer, the classifier)
NETS = [
    ("resnet18", "layer3", "avgpool", "fc"),
    pytest.param("vgg11", "features.10", "classifier.5", "classifier.6", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("arch", "layer", "contrast", "classifier"), NETS)
@pytest.mark.parametrize("contrastive", [False, True])
def test_excitation_backprop_equals_torchray_in_float64(
    arch, layer, contrast, classifier, contrastive
):
    net, x = _net(arch, torch.float64), _image(dtype=torch.float64)
    targets = [3, 500]
    ours = cnnscan.explain(
        net, x, "excitation_backprop", targets=targets, layer=layer, contrastive=contrastive
    )
    assert ours.layer == layer
    for k, target in enumerate(targets):
        if contrastive:
            theirs = ebp.contrastive_excitation_backprop(
                net, x.clone(), target, layer, contrast, classifier_layer=classifier
            )
        else:
            theirs = ebp.excitation_backprop(net, x.clone(), target, saliency_layer=layer)
        assert theirs.abs().max() > 0
        torch.testing.assert_close(ours.maps[0, k], theirs[0], rtol=1e-9, atol=1e-12)


def test_excitation_backprop_is_a_probability_split_on_a_hand_net():
    """Two inputs, one linear layer: the target's probability 1 is split in proportion to
    x_i · w_i⁺ (the negative weight and the bias get nothing)."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 2, 1, bias=False),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 2),
    )
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).view(2, 3, 1, 1))
        net[3].weight.zero_()
        net[3].weight[0, 0], net[3].weight[0, 4], net[3].weight[0, 1] = 2.0, 1.0, -5.0
        net[3].bias.fill_(7.0)
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0, 0, 0], x[0, 1, 0, 0], x[0, 0, 0, 1] = 1.0, 3.0, 4.0  # unit 0 ← 1, unit 4 ← 3
    attr = cnnscan.explain(net, x, "excitation_backprop", targets=[0], layer="1")
    expected = torch.zeros(1, 2, 2)
    expected[0, 0, 0] = 1.0  # 2·1 / (2·1 + 1·3) + 1·3 / (2·1 + 1·3): both units at pixel (0, 0)
    torch.testing.assert_close(attr.maps[0, 0], expected)


@pytest.mark.parametrize("variant", ["preserve", "delete", "dual"])
def test_extremal_perturbation_equals_torchray(variant):
    net, x = _net("resnet18"), _image()
    targets, settings = [3, 7], {"max_iter": 12, "step": 4, "sigma": 8.0}
    ours = cnnscan.explain(
        net, x, "extremal_perturbation", targets=targets, variant=variant, **settings
    )
    for k, target in enumerate(targets):
        theirs, _ = ep.extremal_perturbation(net, x.clone(), target, variant=variant, **settings)
        assert ours.maps[0, k].shape == theirs[0].shape
        # float32, BatchNorm folded in ours: the masks agree to rounding
        torch.testing.assert_close(ours.maps[0, k], theirs[0], rtol=0, atol=2e-3)
    assert ours.extras["area_loss"].shape == (1, 2)


def test_extremal_masks_optimized_one_at_a_time_are_those_optimized_together():
    """Masks are independent: a batch of one (batch_size=1 cuts the optimization into one
    group per mask) gives the masks of every image's targets optimized in one batch."""
    net, x = _net("resnet18"), torch.cat([_image(), _image().flip(-1)])
    settings = {"targets": [3, 7], "max_iter": 4, "step": 4, "sigma": 8.0}
    together = cnnscan.explain(net, x, "extremal_perturbation", **settings)
    apart = cnnscan.explain(net, x, "extremal_perturbation", batch_size=1, **settings)
    assert together.maps.shape == (2, 2, 1, 64, 64)
    torch.testing.assert_close(together.maps, apart.maps, rtol=0, atol=1e-4)
    torch.testing.assert_close(together.extras["reward"], apart.extras["reward"])


def test_smooth_masks_and_area_loss_are_torchray_s():
    ours = SmoothMasks((20, 27), 3, 5.0, "cpu")
    theirs = ep.MaskGenerator((20, 27), 3, 5.0)
    assert list(ours.shape_in) == theirs.shape_in
    params = torch.rand(2, 1, *ours.shape_in, generator=torch.Generator().manual_seed(0))
    for a, b in zip(ours(params), theirs.generate(params), strict=True):
        torch.testing.assert_close(a, b)
    # the hand-written backward of the pooling is autograd's through torchray's generator
    weights = torch.rand(1, 1, 20, 27, generator=torch.Generator().manual_seed(1))
    grads = []
    for generate in (ours, theirs.generate):
        leaf = params.clone().requires_grad_(True)
        cropped, full = generate(leaf)
        ((cropped * weights).sum() + (full**2).sum()).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(*grads)
    full = ours(params)[1]
    reference = torch.ones_like(full.flatten(1))
    reference[:, : int(reference.shape[1] * 0.7)] = 0
    expected = ((full.flatten(1).sort(dim=1)[0] - reference) ** 2).mean(dim=1)
    torch.testing.assert_close(area_loss(full, 0.3), expected)


def test_the_first_smooth_mask_is_torchray_s_to_the_bit():
    """Masks start at all ones, where the mask repeats every `step` pixels: the area loss
    sorts thousands of tied values, so its gradient goes where torchray's goes only if the
    values are the same bits."""
    ours, theirs = SmoothMasks((224, 224), 7, 21.0, "cpu"), ep.MaskGenerator((224, 224), 7, 21)
    params = torch.ones(1, 1, *ours.shape_in)
    for a, b in zip(ours(params), theirs.generate(params), strict=True):
        assert torch.equal(a, b)


def test_the_extremal_mask_finds_the_region_the_logit_sums():
    """A net whose logit is the sum of a 16×16 square of an image that is bright only there
    (blurring it lowers the logit): the preserved mask of area 1/16 covers that square and
    little else."""

    class Region(torch.nn.Module):
        def forward(self, x):
            inside = x[:, :, 8:24, 32:48].sum(dim=(1, 2, 3))
            return torch.stack([inside, -inside], dim=1)

    x = torch.zeros(1, 3, 64, 64)
    x[:, :, 8:24, 32:48] = 1
    attr = cnnscan.explain(
        Region(),
        x,
        "extremal_perturbation",
        targets=[0],
        area=1 / 16,
        max_iter=300,
        step=4,
        sigma=4.0,
    )
    mask = attr.maps[0, 0, 0]
    assert mask[8:24, 32:48].mean() > 0.9
    outside = mask.sum() - mask[8:24, 32:48].sum()
    assert outside / (64 * 64 - 16 * 16) < 0.15


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("extremal_perturbation", {"area": 0}, "area"),
        ("extremal_perturbation", {"area": 1.0}, "area"),
        ("extremal_perturbation", {"variant": "keep"}, "variant"),
        ("extremal_perturbation", {"levels": 1}, "levels"),
        ("extremal_perturbation", {"max_iter": 0}, "max_iter"),
        ("extremal_perturbation", {"sigma": -1.0}, "sigma"),
        ("excitation_backprop", {"contrastive": "yes"}, "contrastive"),
        ("excitation_backprop", {"layer": "nope"}, "nope"),
        ("excitation_backprop", {"layer": "fc"}, "spatial"),
    ],
)
def test_bad_options_are_refused(method, options, match):
    net = torchvision.models.resnet18(weights=None).eval()
    with pytest.raises((MethodError, cnnscan.errors.LayerError), match=match):
        cnnscan.explain(net, torch.zeros(1, 3, 32, 32), method, **options)
