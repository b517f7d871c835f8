"""Perturbation methods against captum 0.9.0 (Occlusion), the lime 0.2.0.1 package, exact
Shapley values by enumeration, and toy models whose answer is known in closed form."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from captum.attr import Occlusion
from helpers import SafetyNet, SmallConvNet, assert_unchanged, snapshot
from lime.lime_image import LimeImageExplainer
from torch import nn

import cnnscan
from cnnscan.errors import MethodError
from cnnscan.methods.gradient import make_baseline
from cnnscan.methods.perturbation import _RiseMasks
from cnnscan.methods.superpixels import segment
from cnnscan.models.preprocessing import Preprocessing
from cnnscan.scan import make_scan


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


class Softmaxed(nn.Module):
    """captum's forward in probability space."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).softmax(dim=1)


class Untraceable(SmallConvNet):
    """Data-dependent control flow: torch.fx cannot trace it, so occlusion runs whole copies."""

    def forward(self, x):
        if float(x.detach().abs().sum()) < 0:  # never true, but decided by the data
            x = -x
        return super().forward(x)


def captum_occlusion(net, x, target, window, stride, baseline, space) -> torch.Tensor:
    forward = Softmaxed(net) if space == "probability" else net
    wh, ww = window if isinstance(window, tuple) else (window, window)
    sy, sx = stride if isinstance(stride, tuple) else (stride, stride)
    return Occlusion(forward).attribute(
        x,
        sliding_window_shapes=(3, wh, ww),
        strides=(3, sy, sx),
        baselines=baseline,
        target=target,
        perturbations_per_eval=8,
    )


# -- occlusion ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fill", "space", "window", "stride"),
    [
        ("zero", "logit", 8, 4),  # 30 px: the last window in each direction is cut at 32
        ("mean", "probability", (6, 10), (3, 5)),
        (0.7, "logit", 30, 1),  # the whole image in one window
        ("blur", "probability", 5, 5),
    ],
)
@pytest.mark.parametrize("net_class", [SmallConvNet, Untraceable])
def test_occlusion_equals_captum_on_a_small_net(net_class, fill, space, window, stride):
    net = net_class().eval()
    x = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    targets = [[2, 0], [4, 1]]
    attr = cnnscan.explain(
        net, x, "occlusion", targets=targets, window=window, stride=stride, fill=fill, space=space
    )
    assert attr.extras["incremental"] is (net_class is SmallConvNet)
    baseline = make_baseline(make_scan(net, x), fill) if isinstance(fill, str) else fill
    assert attr.maps.shape == (2, 2, 1, 30, 30)
    for i, t in itertools.product(range(2), range(2)):
        base = baseline[i : i + 1] if isinstance(baseline, torch.Tensor) else baseline
        ref = captum_occlusion(net, x[i : i + 1], targets[i][t], window, stride, base, space)
        torch.testing.assert_close(attr.maps[i, t, 0], ref[0, 0], atol=2e-6, rtol=1e-4)


def test_every_target_comes_from_the_same_forwards():
    net = SmallConvNet().eval()
    x = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    both = cnnscan.explain(net, x, "occlusion", targets=[[3, 1]], window=8, stride=4)
    assert both.extras["forwards"] == 25  # 5 × 5 windows, not 5 × 5 × 2 targets
    for t, class_id in enumerate([3, 1]):
        alone = cnnscan.explain(net, x, "occlusion", targets=[class_id], window=8, stride=4)
        torch.testing.assert_close(both.maps[:, t], alone.maps[:, 0])


def test_occlusion_leaves_the_model_unchanged_on_the_incremental_path():
    net = SafetyNet()  # no user hook: occlusion traces it and runs boxes
    net.train()
    net.conv1.weight.requires_grad_(False)
    before = snapshot(net)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    attr = cnnscan.explain(net, x, "occlusion", targets=[1, 3], window=4, stride=2)
    assert attr.extras["incremental"]
    assert_unchanged(before, net)
    reference = cnnscan.explain(net.eval(), x, "occlusion", targets=[1, 3], window=4, stride=2)
    torch.testing.assert_close(attr.maps, reference.maps)


@pytest.mark.slow
def test_occlusion_equals_captum_on_the_default_model(default_model, chelsea):
    # 48-px windows every 32 px: 7 × 7 windows, the last ones cut at the border.
    x = default_model.preprocess(chelsea)
    attr = cnnscan.explain(default_model, x, "occlusion", targets="top2", window=48, stride=32)
    assert attr.extras["incremental"] and attr.extras["windows"] == (7, 7)
    for t in range(2):
        ref = captum_occlusion(
            default_model.module.eval(), x, int(attr.targets[0, t]), 48, 32, 0.0, "probability"
        )
        assert pearson(attr.maps[0, t, 0], ref[0, 0]) > 0.9999
        torch.testing.assert_close(attr.maps[0, t, 0], ref[0, 0], atol=1e-5, rtol=1e-3)


# -- RISE ---------------------------------------------------------------------------------------
def test_rise_equals_its_definition_with_the_same_masks():
    net = SmallConvNet().eval()
    x = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(3))
    attr = cnnscan.explain(net, x, "rise", targets=[[1, 2], [0, 2]], n_masks=40, cell=4, seed=5)
    masks = _RiseMasks(40, 4, 0.5, (20, 20), seed=5)(slice(None))  # (40, 20, 20)
    for i, row in enumerate([[1, 2], [0, 2]]):
        with torch.no_grad():
            probabilities = net(x[i] * masks.unsqueeze(1)).softmax(dim=1)[:, row]  # (40, 2)
        expected = torch.einsum("kt,khw->thw", probabilities, masks) / (40 * 0.5)
        torch.testing.assert_close(attr.maps[i, :, 0], expected, atol=1e-6, rtol=1e-5)
    assert attr.extras["forwards"] == 80


def test_rise_masks_follow_the_paper():
    masks = _RiseMasks(2000, 7, 0.3, (50, 60), seed=0)
    m = masks(slice(None))
    assert m.shape == (2000, 50, 60) and float(m.min()) >= 0 and float(m.max()) <= 1
    assert abs(float(m.mean()) - 0.3) < 0.01  # E[mask] = p
    assert masks.cell_size == (8, 9) and masks.up == (64, 72)  # ceil(H / cell), (cell + 1) ×
    # Bilinear upsampling of a binary grid: values between the cells, not only 0 and 1.
    assert float(((m > 0.05) & (m < 0.95)).float().mean()) > 0.2


def test_rise_is_reproducible_under_a_seed():
    net = SmallConvNet().eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    first = cnnscan.explain(net, x, "rise", targets=[1], n_masks=30, seed=7).maps
    again = cnnscan.explain(net, x, "rise", targets=[1], n_masks=30, seed=7).maps
    other = cnnscan.explain(net, x, "rise", targets=[1], n_masks=30, seed=8).maps
    torch.testing.assert_close(again, first, atol=1e-6, rtol=1e-5)  # batch sizes may differ
    assert (other - first).abs().max() > 1e-3 * first.abs().max()


@pytest.mark.slow
def test_rise_agrees_with_occlusion_on_the_default_model(default_model, chelsea):
    x = default_model.preprocess(chelsea)
    rise = cnnscan.explain(default_model, x, "rise", targets=[285], n_masks=500, seed=0)
    occl = cnnscan.explain(default_model, x, "occlusion", targets=[285], window=32, stride=16)
    r = pearson(rise.maps[0, 0, 0], occl.maps[0, 0, 0])
    print(f"Pearson r(RISE 500 masks, occlusion 32/16) on chelsea = {r:.3f}")
    assert r > 0.3


# -- toy models whose superpixel attributions are known -----------------------------------------
def grid_labels(height: int, width: int, rows: int, cols: int) -> torch.Tensor:
    """A label map of rows × cols equal blocks."""
    ys = torch.arange(height) * rows // height
    xs = torch.arange(width) * cols // width
    return ys[:, None] * cols + xs[None, :]


class SegmentLinear(nn.Module):
    """f(x) = W · (mean colour of each segment) + b: removing segment s changes the logits
    by exactly W[:, s] · (mean_s(x) − mean_s(fill))."""

    def __init__(self, labels: torch.Tensor, classes: int = 3, seed: int = 0):
        super().__init__()
        count = int(labels.max()) + 1
        one_hot = nn.functional.one_hot(labels.flatten(), count).double()
        self.register_buffer("average", (one_hot / one_hot.sum(0)).float())  # (HW, S)
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(classes, 3 * count, generator=gen))
        self.bias = nn.Parameter(torch.randn(classes, generator=gen))

    def features(self, x):
        return (x.flatten(2) @ self.average).flatten(1)  # (N, 3·S), channel-major

    def forward(self, x):
        return self.features(x) @ self.weight.T + self.bias


def sized(net: nn.Module, labels: torch.Tensor) -> cnnscan.Model:
    """The toy model for inputs of the label map's size only."""
    return cnnscan.load_model(net, preprocessing=Preprocessing(size=tuple(labels.shape)))


def linear_contributions(net: SegmentLinear, x: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """(classes, S): W · (features(x) − features(fill)) per segment."""
    with torch.no_grad():
        delta = (net.features(x) - net.features(fill))[0]  # (3·S,)
    per_feature = net.weight.detach() * delta  # (classes, 3·S)
    return per_feature.view(len(per_feature), 3, -1).sum(dim=1)


@pytest.mark.parametrize("n_samples", [62, 400])  # 6 segments: all 62 coalitions, or sampled
def test_kernel_shap_gives_the_linear_contributions_of_a_linear_model(n_samples):
    labels = grid_labels(12, 18, 2, 3 if n_samples == 62 else 6)  # 6 or 12 segments
    net = SegmentLinear(labels).eval()
    x = torch.randn(1, 3, 12, 18, generator=torch.Generator().manual_seed(5))
    attr = cnnscan.explain(
        sized(net, labels),
        x,
        "kernel_shap",
        targets=[[0, 2]],
        segments=labels,
        fill="mean",
        n_samples=n_samples,
    )
    assert attr.extras["exact"] is (n_samples == 62)
    fill = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    expected = linear_contributions(net, x, fill)[[0, 2]]
    torch.testing.assert_close(attr.extras["weights"][0], expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        gap = (net(x) - net(fill))[0, [0, 2]]
    torch.testing.assert_close(attr.extras["weights"][0].sum(dim=1), gap, atol=1e-4, rtol=1e-4)
    assert float(attr.extras["sum_error"].abs().max()) < 1e-4
    torch.testing.assert_close(attr.extras["base_value"][0], net(fill)[0, [0, 2]].detach())
    # the map paints each segment with its value
    torch.testing.assert_close(attr.maps[0, :, 0], expected[:, labels], atol=1e-4, rtol=1e-4)


def exact_shapley(value, m: int) -> torch.Tensor:
    """φ_j = Σ_S |S|!(M−|S|−1)!/M! (v(S ∪ j) − v(S)), by enumerating every coalition."""
    phi = torch.zeros(m, dtype=torch.float64)
    for j in range(m):
        others = [k for k in range(m) if k != j]
        for size in range(m):
            weight = math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)
            for subset in itertools.combinations(others, size):
                phi[j] += weight * (value(set(subset) | {j}) - value(set(subset)))
    return phi


def test_kernel_shap_gives_exact_shapley_values_of_a_nonlinear_net():
    net = SmallConvNet().eval()
    x = torch.randn(1, 3, 16, 24, generator=torch.Generator().manual_seed(6))
    labels = grid_labels(16, 24, 2, 3)
    attr = cnnscan.explain(
        net, x, "kernel_shap", targets=[3], segments=labels, fill=0.0, n_samples=100
    )
    assert attr.extras["exact"]
    subsets = list(itertools.product([0, 1], repeat=6))
    masks = torch.tensor(subsets)[:, labels].unsqueeze(1)  # (64, 1, 16, 24)
    with torch.no_grad():
        values = dict(zip(subsets, net(x * masks)[:, 3].tolist(), strict=True))

    def value(on: set[int]) -> float:
        return values[tuple(int(k in on) for k in range(6))]

    expected = exact_shapley(value, 6)
    ours = attr.extras["weights"][0][0].double()
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_lime_recovers_the_linear_model_and_its_surrogate_sums_to_the_output():
    labels = grid_labels(12, 12, 3, 3)
    net = SegmentLinear(labels).eval()
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(7))
    attr = cnnscan.explain(
        sized(net, labels),
        x,
        "lime",
        targets=[[1, 2]],
        segments=labels,
        fill=0.0,
        alpha=0.0,
        space="logit",
        n_samples=200,
    )
    expected = linear_contributions(net, x, torch.zeros_like(x))[[1, 2]]
    torch.testing.assert_close(attr.extras["weights"][0], expected, atol=1e-4, rtol=1e-4)
    # surrogate at "everything on" = intercept + Σ weights = f(x); R² = 1 for a linear model
    surrogate = attr.extras["intercept"][0] + attr.extras["weights"][0].sum(dim=1).double()
    torch.testing.assert_close(surrogate.float(), net(x)[0, [1, 2]].detach(), atol=1e-4, rtol=0)
    assert float(attr.extras["r2"].min()) > 0.999999


def test_lime_equals_the_lime_package():
    net = SmallConvNet().eval()
    x = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(8))
    labels = grid_labels(24, 24, 4, 4)
    attr = cnnscan.explain(net, x, "lime", targets=[[2, 4]], segments=labels, n_samples=150)

    def classifier(images: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        with torch.no_grad():
            return net(batch).softmax(dim=1).double().numpy()

    explainer = LimeImageExplainer(kernel_width=0.25, random_state=0)
    explanation = explainer.explain_instance(
        x[0].permute(1, 2, 0).double().numpy(),
        classifier,
        labels=(2, 4),
        top_labels=None,
        num_features=16,
        num_samples=150,
        segmentation_fn=lambda image: labels.numpy(),
        random_seed=0,
    )
    for t, class_id in enumerate([2, 4]):
        reference = dict(explanation.local_exp[class_id])
        expected = torch.tensor([reference[s] for s in range(16)], dtype=torch.float32)
        torch.testing.assert_close(attr.extras["weights"][0][t], expected, atol=1e-5, rtol=1e-4)
        assert abs(float(attr.extras["intercept"][0, t]) - explanation.intercept[class_id]) < 1e-5
    assert abs(float(attr.extras["r2"][0, 1]) - explanation.score) < 1e-5  # the last label's


def test_surrogates_are_reproducible_under_a_seed():
    net = SmallConvNet().eval()
    x = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(9))
    labels = grid_labels(24, 24, 4, 4)  # 16 segments: KernelSHAP samples
    for method in ("lime", "kernel_shap"):

        def run(seed: int, method: str = method) -> torch.Tensor:
            options = {"segments": labels, "n_samples": 50, "seed": seed}
            return cnnscan.explain(net, x, method, targets=[1], **options).maps

        first = run(3)
        # equal up to float rounding (measured batch sizes may differ between the calls)
        torch.testing.assert_close(run(3), first, atol=1e-6, rtol=1e-5)
        assert (run(4) - first).abs().max() > 100 * 1e-6 + 1e-5 * first.abs().max()


def test_superpixels_of_a_photo(default_model, chelsea):
    x = nn.functional.interpolate(default_model.preprocess(chelsea), size=(96, 96))
    scan = make_scan(default_model, x)
    for segmenter, low, high in (("slic", 20, 80), ("quickshift", 5, 500)):
        labels = segment(scan, 50, segmenter)
        count = int(labels.max()) + 1
        assert labels.shape == (1, 96, 96) and low <= count <= high, (segmenter, count)
        assert torch.equal(torch.unique(labels), torch.arange(count))  # labels 0..M-1
    own = segment(scan, torch.full((96, 96), 7))  # any integers: relabelled
    assert torch.equal(own, torch.zeros((1, 96, 96), dtype=torch.long))


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("occlusion", {"window": 40}, "larger than the image"),
        ("occlusion", {"window": (8, 33)}, "larger than the image"),
        ("occlusion", {"stride": 0}, "stride must be an integer >= 1"),
        ("occlusion", {"window": 4, "stride": 5}, "larger than the window"),
        ("occlusion", {"fill": "purple"}, "unknown fill 'purple'"),
        ("occlusion", {"fill": float("nan")}, "finite"),
        ("occlusion", {"space": "softmax"}, "space must be one of"),
        ("rise", {"n_masks": 0}, "n_masks must be an integer >= 1"),
        ("rise", {"p": 1.5}, "probability that a cell is kept"),
        ("rise", {"cell": 64}, "larger than the image"),
        ("lime", {"segments": 0}, "segments must be a number"),
        ("lime", {"segments": torch.zeros(5, 5, dtype=torch.long)}, "size of the model input"),
        ("lime", {"segmenter": "watershed"}, "segmenter must be one of"),
        ("lime", {"distance": "euclid"}, "distance must be one of"),
        ("kernel_shap", {"n_samples": 0}, "n_samples must be an integer >= 1"),
        ("kernel_shap", {"fill": "noise"}, "unknown fill"),
    ],
)
def test_bad_options_are_clear_errors(method, options, message):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(MethodError, match=message):
        cnnscan.explain(SmallConvNet(), x, method, targets=[0], **options)


def test_slow_methods_are_not_in_the_default_scan():
    from cnnscan.report import default_methods

    chosen = default_methods()
    for name in ("occlusion", "rise", "lime", "kernel_shap"):
        assert cnnscan.get_method(name).family == "perturbation"
        assert name not in chosen and name in default_methods(full=True)
