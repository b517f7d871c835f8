"""The CAM family against pytorch-grad-cam 1.5.7 and torchcam 0.5.0, closed forms and
hand-built nets."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
import torchcam.methods as tcm
import torchvision
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

import cnnscan
from cnnscan.attribution import resize_maps
from cnnscan.errors import LayerError, ModelError
from cnnscan.layers import unshare

GRADIENT_CAMS = ["gradcam", "gradcam_pp", "xgradcam", "layercam", "hirescam"]
PGC = {
    "gradcam": pgc.GradCAM,
    "gradcam_pp": pgc.GradCAMPlusPlus,
    "xgradcam": pgc.XGradCAM,
    "layercam": pgc.LayerCAM,
    "hirescam": pgc.HiResCAM,
    "eigencam": pgc.EigenCAM,
    "scorecam": pgc.ScoreCAM,
    "ablationcam": pgc.AblationCAM,
}
TORCHCAM = {
    "gradcam": tcm.GradCAM,
    "gradcam_pp": tcm.GradCAMpp,
    "xgradcam": tcm.XGradCAM,
    "layercam": tcm.LayerCAM,
    "scorecam": tcm.ScoreCAM,
}


def pearson(a, b) -> float:
    a = torch.as_tensor(np.asarray(a), dtype=torch.float64).flatten()
    b = torch.as_tensor(np.asarray(b), dtype=torch.float64).flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def minmax(x: torch.Tensor) -> torch.Tensor:
    x = x - x.min()
    return x / x.max().clamp_min(1e-12)


def ours_at_input(attr: cnnscan.Attribution, t: int) -> torch.Tensor:
    """Our map for target t, upsampled and min-max normalized (what the peers return)."""
    return minmax(attr.upsample()[0, t, 0])


@pytest.fixture(scope="module")
def default():
    model = cnnscan.load_model()
    x = model.preprocess("sample:chelsea")
    # Peers hook modules: give the head's call of the shared `_swish` its own module.
    peer = unshare(model.module, "_swish", x).eval()
    return model, x, peer, peer._swish.calls[1], "_swish@1"


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    module = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    return cnnscan.load_model(module), x, module, module.layer4, "layer4"


@pytest.fixture(scope="module")
def vgg11():
    torch.manual_seed(0)
    module = torchvision.models.vgg11(weights=None).eval()
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    return cnnscan.load_model(module), x, module, module.features, "features"


def class_ids(model, x, k=3) -> list[int]:
    return [p["class_id"] for p in cnnscan.predict(model, x, k=k)[0]]


@pytest.mark.parametrize("setup", ["default", "resnet18", "vgg11"])
def test_gradient_cams_match_pytorch_grad_cam(setup, request):
    model, x, peer, peer_layer, layer = request.getfixturevalue(setup)
    targets = class_ids(model, x)
    attrs = cnnscan.explain_many(model, x, [*GRADIENT_CAMS, "eigencam"], targets=targets)
    assert all(a.layer == layer for a in attrs.values())
    for name, attr in attrs.items():
        with PGC[name](model=peer, target_layers=[peer_layer]) as extractor:
            for t, class_id in enumerate(targets):
                theirs = extractor(input_tensor=x, targets=[ClassifierOutputTarget(class_id)])[0]
                ours = ours_at_input(attr, t)
                if name == "eigencam":  # SVD leaves the sign open: compare up to sign
                    flipped = resize_maps(-attr.extras["raw"].clamp_max(0), x.shape[-2:])
                    r = max(pearson(ours, theirs), pearson(minmax(flipped[0, t, 0]), theirs))
                    assert r > 0.99, (name, setup)
                    continue
                if float(np.ptp(theirs)) == 0:  # their map is all zero: so must ours be
                    assert float(attr.maps[0, t].max()) == 0, (name, setup, class_id)
                    continue
                assert pearson(ours, theirs) > 0.99, (name, setup, class_id)


@pytest.mark.parametrize("setup", ["default", "resnet18", "vgg11"])
def test_gradient_cams_match_torchcam(setup, request):
    """torchcam 0.5's Grad-CAM++ divides α in place on a boolean-masked copy
    (`alpha[idx][mask].div_(...)`), which leaves α = g²: its weights are Σ g²·relu(g), not the
    paper's (eq. 19) g² / (2g² + Σ A·g³). They agree only where Σ A·g is small against 2 in
    every channel (so on resnet18 here); on vgg11 and the default model we hold Grad-CAM++
    to pytorch-grad-cam only (the test above)."""
    model, x, peer, peer_layer, _ = request.getfixturevalue(setup)
    targets = class_ids(model, x)
    names = [n for n in GRADIENT_CAMS if n in TORCHCAM]
    if setup in ("vgg11", "default"):
        names.remove("gradcam_pp")
    attrs = cnnscan.explain_many(model, x, names, targets=targets)
    for name, attr in attrs.items():
        with TORCHCAM[name](peer, target_layer=peer_layer) as extractor:
            for t, class_id in enumerate(targets):
                scores = peer(x)
                theirs = extractor(class_idx=class_id, scores=scores)[0][0]
                ours = attr.maps[0, t, 0]
                if float(theirs.max() - theirs.min()) == 0:
                    assert float(ours.max()) == 0, (name, setup, class_id)
                    continue
                assert pearson(ours, theirs) > 0.99, (name, setup, class_id)


def test_layercam_multi_layer_fusion_matches_torchcam(resnet18):
    model, x, peer, _, _ = resnet18
    layers = ["layer3", "layer4"]
    class_id = class_ids(model, x)[0]
    attr = cnnscan.explain(model, x, "layercam", targets=[class_id], layer=layers)
    assert attr.layer == "layer3,layer4" and attr.maps.shape[-2:] == (10, 10)
    with tcm.LayerCAM(peer, target_layer=layers) as extractor:
        cams = extractor(class_idx=class_id, scores=peer(x))
        theirs = extractor.fuse_cams(cams)[0]
    assert pearson(attr.maps[0, 0, 0], theirs) > 0.99


def test_score_cam_matches_both_peers_on_small_input():
    """Random resnet18 at 112 px, layer3 (256 channels): cheap enough for every CI run."""
    torch.manual_seed(0)
    module = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    model = cnnscan.load_model(module)
    targets = class_ids(model, x, k=2)
    attr = cnnscan.explain(model, x, "scorecam", targets=targets, layer="layer3")
    aligned = cnnscan.explain(
        model, x, "scorecam", targets=targets, layer="layer3", align_corners=True
    )
    with pgc.ScoreCAM(model=module, target_layers=[module.layer3]) as extractor:
        for t, class_id in enumerate(targets):
            theirs = extractor(input_tensor=x, targets=[ClassifierOutputTarget(class_id)])[0]
            assert pearson(ours_at_input(aligned, t), theirs) > 0.999
    with tcm.ScoreCAM(module, target_layer="layer3", input_shape=(3, 112, 112)) as extractor:
        for t, class_id in enumerate(targets):
            theirs = extractor(class_idx=class_id, scores=module(x))[0][0]
            assert pearson(attr.maps[0, t, 0], theirs) > 0.999


def test_ablation_cam_matches_pytorch_grad_cam_and_runs_only_the_head(resnet18):
    model, x, peer, peer_layer, _ = resnet18
    targets = class_ids(model, x, k=2)
    attr = cnnscan.explain(model, x, "ablationcam", targets=targets)
    assert attr.extras["head_only"] is True
    with pgc.AblationCAM(model=peer, target_layers=[peer_layer]) as extractor:
        for t, class_id in enumerate(targets):
            theirs = extractor(input_tensor=x, targets=[ClassifierOutputTarget(class_id)])[0]
            assert pearson(ours_at_input(attr, t), theirs) > 0.99


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scorecam", "ablationcam"])
def test_perturbation_cams_match_pytorch_grad_cam_on_the_default_model(default, name):
    model, x, peer, peer_layer, _ = default
    class_id = class_ids(model, x, k=1)[0]
    options = {"align_corners": True} if name == "scorecam" else {}
    attr = cnnscan.explain(model, x, name, targets=[class_id], **options)
    with PGC[name](model=peer, target_layers=[peer_layer]) as extractor:
        theirs = extractor(input_tensor=x, targets=[ClassifierOutputTarget(class_id)])[0]
    assert pearson(ours_at_input(attr, 0), theirs) > 0.999


@pytest.mark.parametrize("setup", ["default", "resnet18"])
def test_cam_equals_gradcam_up_to_scale_on_a_gap_linear_head(setup, request):
    model, x, *_ = request.getfixturevalue(setup)
    attrs = cnnscan.explain_many(model, x, ["cam", "gradcam"], targets="top3")
    raw_cam, raw_grad = attrs["cam"].extras["raw"], attrs["gradcam"].extras["raw"]
    h, w = raw_cam.shape[-2:]
    # Grad-CAM's weights are mean_ij ∂y/∂A = W / (h·w) for GAP + linear.
    torch.testing.assert_close(raw_grad * (h * w), raw_cam, rtol=1e-4, atol=1e-4)


def test_cam_refuses_a_layer_that_does_not_feed_gap_and_linear(vgg11):
    model, x, *_ = vgg11
    with pytest.raises(cnnscan.MethodError, match="global average pooling"):
        cnnscan.explain(model, x, "cam", targets=[0])


def test_guided_gradcam_is_guided_backprop_times_upsampled_gradcam(resnet18):
    model, x, *_ = resnet18
    attrs = cnnscan.explain_many(
        model, x, ["guided_gradcam", "guided_backprop", "gradcam"], targets="top2"
    )
    expected = attrs["guided_backprop"].maps * attrs["gradcam"].upsample()
    torch.testing.assert_close(attrs["guided_gradcam"].maps, expected)
    assert attrs["guided_gradcam"].maps.shape == (1, 2, 3, 160, 160)


def test_guided_gradcam_matches_pytorch_grad_cam(resnet18):
    model, x, peer, peer_layer, _ = resnet18
    class_id = class_ids(model, x, k=1)[0]
    ours = cnnscan.explain(model, x, "guided_gradcam", targets=[class_id]).maps[0, 0]
    with pgc.GradCAM(model=peer, target_layers=[peer_layer]) as extractor:
        heat = extractor(input_tensor=x, targets=[ClassifierOutputTarget(class_id)])[0]
    guided = pgc.GuidedBackpropReLUModel(copy.deepcopy(peer), device="cpu")(x, class_id)
    theirs = guided.transpose(2, 0, 1) * heat[None]
    assert pearson(ours, theirs) > 0.99


def test_one_forward_serves_every_method_and_target(default, monkeypatch):
    model, x, *_ = default
    forwards = []
    original = cnnscan.Scan._forward
    monkeypatch.setattr(cnnscan.Scan, "_forward", lambda self: forwards.append(1) or original(self))
    attrs = cnnscan.explain_many(model, x, [*GRADIENT_CAMS, "cam", "eigencam"], targets="top5")
    assert len(forwards) == 1
    assert all(a.maps.shape == (1, 5, 1, 7, 7) for a in attrs.values())


def test_many_images_and_targets_equal_one_at_a_time(resnet18):
    """In float64, so that batching must give the same numbers, not merely close ones
    (in float32, Ablation-CAM divides logit differences by logits as small as 0.04 here,
    which turns batch-size-dependent rounding into visible noise)."""
    _, x, module, *_ = resnet18
    model = cnnscan.load_model(copy.deepcopy(module).double())
    batch = torch.cat([x, x.flip(-1)]).double()
    targets = torch.tensor([[1, 5, 9], [3, 5, 7]])
    for name in [*GRADIENT_CAMS, "eigencam", "ablationcam"]:
        together = cnnscan.explain(model, batch, name, targets=targets).maps
        assert together.dtype == torch.float64
        for i in range(2):
            alone = cnnscan.explain(model, batch[i : i + 1], name, targets=targets[i].tolist())
            scale = float(together[i].abs().max())
            torch.testing.assert_close(together[i], alone.maps[0], rtol=1e-9, atol=1e-10 * scale)


class TwoBranchNet(nn.Module):
    """Classes 0-2 come from the conv features (GAP + linear); with `side=True` class 3 comes
    only from the input's mean colour. With `dead=True` conv2's output is all zeros."""

    def __init__(self, dead: bool = False, side: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(6, 3)
        self.side = nn.Linear(3, 1) if side else None
        if dead:
            with torch.no_grad():
                self.conv2.weight.zero_()
                self.conv2.bias.fill_(-1.0)

    def forward(self, x):
        features = self.relu(self.conv2(self.relu(self.conv1(x))))
        main = self.fc(features.mean(dim=(2, 3)))
        if self.side is None:
            return main
        return torch.cat([main, self.side(x.mean(dim=(2, 3)))], dim=1)


ALL_CAMS = [*GRADIENT_CAMS, "cam", "eigencam", "scorecam", "ablationcam", "guided_gradcam"]


@pytest.mark.parametrize("name", ALL_CAMS)
def test_constant_activations_give_zeros_not_nans(name):
    torch.manual_seed(0)
    net = TwoBranchNet(dead=True, side=False)
    x = torch.randn(1, 3, 8, 8)
    attr = cnnscan.explain(net, x, name, targets=[0, 1], layer="relu@1")
    assert torch.isfinite(attr.maps).all()
    assert float(attr.maps.abs().max()) == 0


def test_a_target_that_does_not_depend_on_the_layer_gets_zeros_and_a_warning():
    torch.manual_seed(0)
    net = TwoBranchNet()
    x = torch.randn(1, 3, 8, 8)
    attr = cnnscan.explain(net, x, "gradcam", targets=[0, 3], layer="relu@1")
    assert float(attr.maps[0, 1].abs().max()) == 0
    assert "[3]" in attr.extras["warning"]


def test_default_layer_is_the_last_spatial_activation(default, resnet18):
    assert cnnscan.explain(default[0], default[1], "gradcam").layer == "_swish@1"
    assert cnnscan.explain(resnet18[0], resnet18[1], "gradcam").layer == "layer4"


def test_unknown_and_non_spatial_layers_are_clear_errors(resnet18):
    model, x, *_ = resnet18
    with pytest.raises(LayerError, match="layer4"):
        cnnscan.explain(model, x, "gradcam", layer="layer5")
    with pytest.raises(LayerError, match="spatial"):
        cnnscan.explain(model, x, "gradcam", layer="fc")


def test_a_model_returning_a_dict_is_a_clear_error():
    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return {"out": self.fc(self.conv(x).mean(dim=(2, 3)))}

    with pytest.raises(ModelError, match="logits"):
        cnnscan.explain(DictNet(), torch.randn(1, 3, 8, 8), "gradcam", targets=[0])


def test_the_model_is_unchanged_after_every_cam(resnet18):
    model, x, module, *_ = resnet18
    x = x[..., :64, :64]  # Score-CAM runs one forward per channel
    before = {k: v.clone() for k, v in module.state_dict().items()}
    for name in ALL_CAMS:
        cnnscan.explain(model, x, name, targets=[0], layer="layer4")
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks and not m._backward_hooks for m in module.modules())
