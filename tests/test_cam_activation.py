"""The activation-only CAMs (cnnscan.methods.cam_activation: Eigen-CAM, KPCA-CAM, FEM, deep
feature factorization) against pytorch-grad-cam 1.5.7 and their closed forms."""

from __future__ import annotations

import pytest
import pytorch_grad_cam as pgc
import torch
from helpers import class_ids, minmax, ours_at_input, pearson
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import cnnscan
from cnnscan.attribution import resize_maps

SETUPS = ["cam_default", "cam_resnet18", "cam_vgg11"]


@pytest.mark.parametrize("setup", SETUPS)
def test_kpcacam_and_fem_match_pytorch_grad_cam(setup, request):
    model, x, peer, peer_layer, layer = request.getfixturevalue(setup)
    class_id = class_ids(model, x, k=1)[0]
    attrs = cnnscan.explain_many(model, x, ["kpcacam", "fem"], targets=[class_id, 0])
    for name, cls in [("kpcacam", pgc.KPCA_CAM), ("fem", pgc.FEM)]:
        attr = attrs[name]
        assert attr.layer == layer
        torch.testing.assert_close(attr.maps[:, 0], attr.maps[:, 1])  # class-agnostic
        with cls(model=peer, target_layers=[peer_layer]) as extractor:
            theirs = extractor(input_tensor=x, targets=[ClassifierOutputTarget(class_id)])[0]
        assert pearson(ours_at_input(attr, 0), theirs) > 0.999, (name, setup)


@pytest.mark.parametrize("kernel", ["rbf", "poly", "linear", "cosine"])
def test_kpcacam_kernels_match_pytorch_grad_cam(cam_resnet18, kernel):
    model, x, peer, *_ = cam_resnet18
    attr = cnnscan.explain(model, x, "kpcacam", targets=[0], layer="layer3", kernel=kernel)
    with pgc.KPCA_CAM(model=peer, target_layers=[peer.layer3], kernel=kernel) as extractor:
        theirs = extractor(input_tensor=x, targets=[ClassifierOutputTarget(0)])[0]
    assert pearson(ours_at_input(attr, 0), theirs) > 0.999, kernel


def test_kpcacam_with_the_linear_kernel_is_eigencam(cam_resnet18):
    model, x, *_ = cam_resnet18
    attrs = cnnscan.explain_many(
        model, x, ["kpcacam", "eigencam"], targets=[0], options={"kpcacam": {"kernel": "linear"}}
    )
    torch.testing.assert_close(attrs["kpcacam"].extras["raw"], attrs["eigencam"].extras["raw"])


def test_kpcacam_refuses_a_layer_with_too_many_positions(cam_resnet18):
    model, *_ = cam_resnet18
    x = torch.randn(1, 3, 288, 288)  # layer1: 72 × 72 = 5184 positions
    with pytest.raises(cnnscan.MethodError, match="positions"):
        cnnscan.explain(model, x, "kpcacam", targets=[0], layer="layer1")


class Fixed(torch.nn.Module):
    """A classifier whose layer `features` outputs the same activations for every input."""

    def __init__(self, acts: torch.Tensor):
        super().__init__()
        self.acts = acts
        self.features = torch.nn.Identity()
        self.fc = torch.nn.Linear(len(acts), 3)

    def forward(self, x):
        a = self.features(self.acts.expand(len(x), -1, -1, -1) + 0 * x.mean())
        return self.fc(a.mean(dim=(2, 3)))


def test_fem_weighs_each_channel_by_its_share_above_mean_plus_k_std():
    acts = torch.tensor([[0.0, 0.0, 0.0, 10.0], [1.0, 2.0, 3.0, 4.0]]).view(2, 2, 2)
    net, x = Fixed(acts), torch.zeros(1, 3, 4, 4)
    attr = cnnscan.explain(net, x, "fem", targets=[0], layer="features", n_std=1.5)
    # channel 0: mean 2.5 + 1.5 · std 4.33 = 9.0, only 10 is above (share 1/4);
    # channel 1: 2.5 + 1.5 · 1.12 = 4.18, none above
    torch.testing.assert_close(attr.extras["raw"][0, 0, 0], acts[0] / 4)


@pytest.mark.parametrize("setup", SETUPS)
def test_dff_factors_match_pytorch_grad_cam(setup, request):
    model, x, peer, peer_layer, _ = request.getfixturevalue(setup)
    targets = class_ids(model, x)
    attr = cnnscan.explain(model, x, "dff", targets=targets, n_components=4)
    concepts = attr.extras["concepts"]
    classifier = {"cam_default": "_fc", "cam_resnet18": "fc"}.get(setup)
    factorize = pgc.DeepFeatureFactorization(
        model=peer,
        target_layer=peer_layer,
        computation_on_concepts=getattr(peer, classifier) if classifier else None,
    )
    try:
        theirs = factorize(x, n_components=4)
    finally:
        factorize.activations_and_grads.release()
    ours_maps = resize_maps(concepts["maps"].unsqueeze(2), x.shape[-2:])[0, :, 0]
    for j in range(4):
        assert pearson(minmax(ours_maps[j]), theirs[1][0][j]) > 0.99, (setup, j)
        assert pearson(concepts["embeddings"][0, j], theirs[0][:, j]) > 0.999, (setup, j)
    if classifier:  # a GAP + linear head scores a concept as the classifier scores it
        expected = torch.as_tensor(theirs[2]).softmax(dim=1)
        torch.testing.assert_close(concepts["probabilities"][0], expected, rtol=1e-3, atol=1e-5)
    for t, class_id in enumerate(targets):
        best = int(concepts["probabilities"][0, :, class_id].argmax())
        assert int(attr.extras["concept"][0, t]) == best
        torch.testing.assert_close(attr.maps[0, t, 0], concepts["maps"][0, best])
