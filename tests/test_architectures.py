"""Every gradient and CAM method on a representative set of torchvision architectures (random
weights, small inputs): the default layer is the usual CAM layer of each, the maps have the
right shapes and are finite, Grad-CAM and CAM equal their closed forms computed by hand with
autograd, and CAM refuses heads that are not GAP + one linear layer."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import cnnscan
from cnnscan.layers import get_module

pytestmark = pytest.mark.slow

# name -> (smallest input size with the same default layer as at full size, that layer,
#          whether the head after it is global average pooling + one linear layer)
ARCHITECTURES = {
    "alexnet": (96, "features", False),
    "vgg16": (64, "features", False),
    "googlenet": (64, "inception5b", True),
    "inception_v3": (107, "Mixed_7c", True),
    "resnet50": (64, "layer4", True),
    "densenet121": (64, "features", False),  # a ReLU sits between the features and the pool
    "mobilenet_v3_small": (64, "features", False),  # two linear layers
    "efficientnet_b0": (64, "features", True),
    "convnext_tiny": (64, "features", False),  # LayerNorm before the linear layer
    "regnet_y_400mf": (64, "trunk_output", True),
    "squeezenet1_0": (64, "classifier.2", False),  # the class maps are the last conv's
    "shufflenet_v2_x0_5": (64, "conv5", True),
}
# Score-CAM and its sampling variants (SS-CAM, IS-CAM) run the whole network once or more per
# channel of the layer (440 to 2048 here): they run on the architecture with the fewest
# channels (their masked forwards are the same code on every architecture); Ablation-CAM
# re-runs only the head once per channel, everywhere but AlexNet and VGG16, whose 60- and
# 120-million-weight heads would take seconds.
SCORECAM = {"regnet_y_400mf"}
MASKING_CAMS = {"scorecam", "sscam", "iscam"}
NO_ABLATIONCAM = {"alexnet", "vgg16"}
OPTIONS = {  # the fewest samples and steps: these run the network at new inputs
    "smoothgrad": {"n_samples": 1},
    "gradient_shap": {"n_samples": 1},
    "integrated_gradients": {"n_steps": 2},
    "smoothgradcam_pp": {"n_samples": 1},
    "sscam": {"n_samples": 1},
    "iscam": {"n_samples": 1},
    "blur_ig": {"n_steps": 2},
    "guided_ig": {"n_steps": 2},
    "xrai": {"n_steps": 2},
    "layer_conductance": {"n_steps": 2},
    "internal_influence": {"n_steps": 2},
}
TARGET = 7


def methods_for(name: str) -> list[str]:
    chosen = []
    for info in cnnscan.list_methods():
        if info.family not in ("gradient", "cam"):
            continue
        if info.name in MASKING_CAMS and name not in SCORECAM:
            continue
        if info.name == "ablationcam" and name in NO_ABLATIONCAM:
            continue
        if info.name == "cam" and not ARCHITECTURES[name][2]:
            continue
        chosen.append(info.name)
    return chosen


def build(name: str) -> tuple[cnnscan.Model, torch.Tensor]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet/inception_v3 init notices
        model = cnnscan.load_model(name, weights=None)
    size = ARCHITECTURES[name][0]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model, x


def by_hand(module: nn.Module, x: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's activation (a protected copy) and the target logit's gradient w.r.t. it."""
    net = module.eval()
    seen = {}

    def keep(_module, _inputs, output):
        seen["a"] = output.clone()
        return seen["a"] + 0  # a new tensor: an in-place op after the layer leaves "a" alone

    handle = get_module(net, layer).register_forward_hook(keep)
    try:
        logits = net(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[0, TARGET], seen["a"])
    return seen["a"].detach(), grad


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_method_on_the_architecture(name):
    model, x = build(name)
    size, expected_layer, gap_linear = ARCHITECTURES[name]
    methods = methods_for(name)
    options = {method: OPTIONS[method] for method in methods if method in OPTIONS}
    results = cnnscan.explain_many(model, x, methods, targets=[TARGET], options=options)
    assert list(results) == methods
    acts, grad = by_hand(model.module, x, expected_layer)
    for method, attr in results.items():
        info = cnnscan.get_method(method)
        assert torch.isfinite(attr.maps).all(), method
        if info.space == "layer":
            assert attr.layer == expected_layer, method
            assert attr.maps.shape == (1, 1, 1, *acts.shape[-2:]), method
        else:
            assert attr.maps.shape[-2:] == (size, size), method
        if info.family == "gradient":  # (a relu'd CAM may be all zero for random weights)
            assert attr.maps.abs().sum() > 0, method

    # Grad-CAM's closed form: relu(Σ_k mean_ij(g_k) A_k), at the default layer.
    expected = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1))
    torch.testing.assert_close(results["gradcam"].maps[0, 0, 0], expected[0], rtol=1e-4, atol=1e-6)
    if gap_linear:  # CAM's: relu(Σ_k W[target, k] A_k), W the linear layer after the pooling
        fc = [m for m in model.module.modules() if isinstance(m, nn.Linear)][-1]
        expected = torch.relu(torch.einsum("k,nkhw->nhw", fc.weight[TARGET].detach(), acts))
        torch.testing.assert_close(results["cam"].maps[0, 0, 0], expected[0], rtol=1e-4, atol=1e-5)
    else:
        with pytest.raises(cnnscan.MethodError, match="global average pooling"):
            cnnscan.explain(model, x, "cam", targets=[TARGET])
