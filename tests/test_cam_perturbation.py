"""The CAMs that run extra forwards (cnnscan.methods.cam_perturbation): IS-CAM and SS-CAM
against torchcam 0.5.0 with the same noise, Score-CAM as their limit, and ReciproCAM against
its definition (Byun & Lee 2022) on hand-built nets and resnet18. (Score-CAM and
Ablation-CAM against the peers: test_cam.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
import torchcam.methods as tcm
import torchvision
from helpers import SmallConvNet, class_ids, pearson
from torch import nn

import cnnscan

SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def small_resnet18():
    """Random resnet18 at 64 px, layer3 (256 channels at 4 × 4): cheap enough for every run."""
    torch.manual_seed(0)
    module = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    return cnnscan.load_model(module), x, module, module.layer3, "layer3"


@pytest.fixture(scope="module")
def small_vgg11():
    """Random vgg11 at 64 px, features (512 channels at 2 × 2)."""
    torch.manual_seed(0)
    module = torchvision.models.vgg11(weights=None).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    return cnnscan.load_model(module), x, module, module.features, "features"


# The peers run every channel mask per sample and target: vgg11 and the default model (1,280
# channels at 224 px, kept to one sample) are marked slow.
SETUPS = [
    "small_resnet18",
    pytest.param("small_vgg11", marks=SLOW),
    pytest.param("cam_default", marks=SLOW),
]


def _samples(setup: str) -> int:
    return 1 if setup == "cam_default" else 2


@pytest.mark.parametrize("setup", SETUPS)
def test_iscam_matches_torchcam(setup, request):
    model, x, peer, peer_layer, layer = request.getfixturevalue(setup)
    targets = class_ids(model, x, k=2)
    n = _samples(setup)
    attr = cnnscan.explain(model, x, "iscam", targets=targets, layer=layer, n_samples=n)
    with tcm.ISCAM(peer, target_layer=peer_layer, num_samples=n) as extractor:
        for t, class_id in enumerate(targets):
            theirs = extractor(class_idx=class_id, scores=peer(x))[0][0]
            assert pearson(attr.maps[0, t, 0], theirs) > 0.999, (setup, class_id)


@pytest.mark.parametrize("setup", SETUPS)
def test_sscam_matches_torchcam_with_the_same_noise(setup, request):
    """torchcam also runs the all-zero channels (noise-only masks); their scores only scale
    the map, so the maps agree once both are min-max normalized (torchcam's output)."""
    model, x, peer, peer_layer, layer = request.getfixturevalue(setup)
    targets = class_ids(model, x, k=2)
    n = _samples(setup)
    attr = cnnscan.explain(model, x, "sscam", targets=targets, layer=layer, n_samples=n, seed=5)
    with tcm.SSCAM(peer, target_layer=peer_layer, num_samples=n) as extractor:
        for t, class_id in enumerate(targets):
            scores = peer(x)
            torch.manual_seed(5)
            theirs = extractor(class_idx=class_id, scores=scores)[0][0]
            assert pearson(attr.maps[0, t, 0], theirs) > 0.999, (setup, class_id)


def test_iscam_of_one_sample_is_scorecam_and_sscam_without_noise_is_scorecam_up_to_scale(
    small_resnet18,
):
    model, x, *_ = small_resnet18
    layer = "layer3"  # 256 channels at 4 × 4, some of them all zero
    attrs = cnnscan.explain_many(
        model,
        x,
        ["iscam", "sscam", "scorecam"],
        targets="top2",
        layer=layer,
        options={"iscam": {"n_samples": 1}, "sscam": {"n_samples": 1, "noise_level": 0}},
    )
    score = attrs["scorecam"].extras["raw"]
    torch.testing.assert_close(attrs["iscam"].extras["raw"], score)
    dead = int((attrs["sscam"].extras["channels"]) - attrs["sscam"].extras["forwards"])
    assert dead > 0  # the skipped channels exist, and only scale the map:
    smooth = attrs["sscam"].extras["raw"]
    factor = (smooth * score).sum(dim=(2, 3, 4), keepdim=True) / (score * score).sum(
        dim=(2, 3, 4), keepdim=True
    )
    assert bool((factor > 1).all())  # fewer channels share the softmax
    torch.testing.assert_close(smooth, factor * score)


@pytest.mark.parametrize("name", ["iscam", "sscam"])
def test_masking_cams_of_a_batch_equal_one_image_at_a_time(name):
    net = SmallConvNet(classes=4).double().eval()
    batch = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6)).double()
    targets = torch.tensor([[1, 2], [3, 2]])
    options = {"n_samples": 3, "layer": "conv3"}
    together = cnnscan.explain(net, batch, name, targets=targets, **options).maps
    for i in range(2):
        alone = cnnscan.explain(net, batch[i : i + 1], name, targets=targets[i].tolist(), **options)
        torch.testing.assert_close(together[i], alone.maps[0], rtol=1e-9, atol=1e-12)


# -- ReciproCAM: the paper's definition ---------------------------------------------------------
def _reciprocam(head, acts: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """The definition: softmax(head(A ⊙ M_ij))_c for the one-hot mask M_ij of each position,
    one position at a time: (T, h, w)."""
    h, w = acts.shape[-2:]
    out = torch.zeros(len(classes), h, w)
    for i in range(h):
        for j in range(w):
            mask = torch.zeros(1, 1, h, w)
            mask[..., i, j] = 1
            probabilities = head(acts.unsqueeze(0) * mask).softmax(dim=1)[0]
            out[:, i, j] = probabilities[classes]
    return out


class FlattenHead(nn.Module):
    """conv → relu → flatten → linear: every position has its own classifier weights."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).flatten(1))


def test_reciprocam_is_the_papers_definition_on_a_flatten_head():
    net = FlattenHead().eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    attr = cnnscan.explain(net, x, "reciprocam", targets=[0, 3], layer="relu")
    assert attr.extras["head_only"] is True and attr.extras["forwards"] == 2 * 36
    for i in range(2):
        acts = net.relu(net.conv(x[i : i + 1]))[0].detach()
        expected = _reciprocam(lambda a: net.fc(a.flatten(1)), acts, [0, 3])
        torch.testing.assert_close(attr.maps[i, :, 0], expected)


def test_reciprocam_is_the_papers_definition_on_resnet18(small_resnet18):
    """Through layer4, pooling and fc: only the part after layer3 runs per position."""
    model, x, module, *_ = small_resnet18
    targets = class_ids(model, x, k=2)
    attr = cnnscan.explain(model, x, "reciprocam", targets=targets, layer="layer3")
    assert attr.extras["head_only"] is True
    net = copy.deepcopy(module)
    with torch.no_grad():
        trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2)
        acts = net.layer3(trunk(x))[0]
        expected = _reciprocam(
            lambda a: net.fc(net.avgpool(net.layer4(a)).flatten(1)), acts, targets
        )
    torch.testing.assert_close(attr.maps[0, :, 0], expected, rtol=1e-4, atol=1e-7)
