"""The metrics added for issue 19 against their references on the same inputs: infidelity and
max/avg-sensitivity against captum 0.9 (given the same perturbations), sensitivity-n, ROAD and
relevance rank accuracy against quantus 0.6."""

from __future__ import annotations

import numpy as np
import pytest
import quantus
import torch
from captum.metrics import infidelity as captum_infidelity
from captum.metrics import sensitivity_max
from helpers import Linear, SmallConvNet
from torch import nn

import cnnscan
from cnnscan.metrics.infidelity import pixel_noise
from cnnscan.metrics.relevance import relevance
from cnnscan.scan import make_scan

TARGETS = torch.tensor([[1], [3]])


@pytest.fixture(scope="module")
def small():
    """A tiny conv net (float64) with two 12×12 images and the gradient × input of fixed
    classes."""
    net = SmallConvNet().double().eval()
    model = cnnscan.load_model(net)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    attr = cnnscan.explain(model, x, "gradient_x_input", targets=TARGETS)
    return net, model, x, attr


def test_infidelity_equals_captum_given_the_same_perturbations(small):
    net, model, x, attr = small
    scores = cnnscan.evaluate(model, None, attr, ["infidelity"], n_samples=7, noise_level=0.1)
    noise = pixel_noise(make_scan(model, x), 7, 0.1, seed=0)  # (N, S, H, W)
    rel = relevance(attr)[:, 0]  # (N, H, W)
    draws = iter(noise.transpose(0, 1))  # captum asks for one draw of every image at a time

    def perturb(inputs):
        pert = next(draws).unsqueeze(1).expand_as(inputs)
        return pert, inputs - pert

    theirs = captum_infidelity(
        net,
        perturb,
        x,
        rel.unsqueeze(1).expand_as(x) / 3,  # Σ_c I_p R_p / 3 = I_p R_p: one value per pixel
        target=TARGETS[:, 0],
        n_perturb_samples=7,
        max_examples_per_batch=2,
        normalize=True,
    )
    assert np.allclose(np.array(scores["infidelity"])[:, 0], theirs.numpy(), rtol=1e-7)
    assert all(v > 0 for v in theirs.tolist())


def test_max_and_avg_sensitivity_equal_captum_given_the_same_perturbations(small):
    _, model, x, attr = small
    scores = cnnscan.evaluate(
        model, None, attr, ["max_sensitivity", "avg_sensitivity"], n_samples=5, noise_level=0.05
    )
    span = (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    noise = (torch.rand((5, 3, 12, 12), generator=gen) * 2 - 1).double()

    def explanation(inputs):  # captum repeats each image once per draw (and may pass a tuple)
        inputs = inputs[0] if isinstance(inputs, tuple) else inputs
        targets = TARGETS.repeat_interleave(len(inputs) // 2, dim=0)
        with torch.enable_grad():  # captum calls it under no_grad
            again = cnnscan.explain(model, inputs, "gradient_x_input", targets=targets)
        return (relevance(again)[:, 0],)  # a tuple: captum iterates over what it gets

    def perturbs(draws):
        def perturb(inputs, radius):
            inputs = inputs[0] if isinstance(inputs, tuple) else inputs
            n = len(inputs) // 2
            return inputs + 0.05 * span.repeat_interleave(n, 0) * noise[draws].repeat(2, 1, 1, 1)

        return perturb

    worst = sensitivity_max(explanation, x, perturbs(list(range(5))), n_perturb_samples=5)
    each = [sensitivity_max(explanation, x, perturbs([s]), n_perturb_samples=1) for s in range(5)]
    assert np.allclose(np.array(scores["max_sensitivity"])[:, 0], worst.numpy(), rtol=1e-9)
    mean = torch.stack(each).mean(dim=0).numpy()
    assert np.allclose(np.array(scores["avg_sensitivity"])[:, 0], mean, rtol=1e-9)
    assert (mean < worst.numpy()).all()


class Gray(nn.Module):
    """quantus 0.6 broadcasts a one-channel map over the input's channels and then indexes
    pixels with channel-value positions (ROAD fails on RGB inputs), so it gets one gray
    channel that this wrapper copies to the three the net reads; cnnscan gets the same
    gray image as three equal channels (every channel is imputed alike)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.double().expand(-1, 3, -1, -1))


@pytest.fixture(scope="module")
def gray():
    """A linear net (its predictions flip as pixels go), six gray 12×12 images, the
    gradient × input of each image's top class, and the relevance quantus is given."""
    net = Linear(shape=(3, 12, 12), classes=4, seed=0).double().eval()
    model = cnnscan.load_model(net)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 12, 12, generator=gen, dtype=torch.float64).expand(-1, 3, -1, -1)
    attr = cnnscan.explain(model, x.contiguous(), "gradient_x_input", targets="top1")
    rel = relevance(attr)[:, 0].numpy()[:, None]
    return Gray(net).eval(), model, x[:, :1].numpy(), attr, rel


def test_road_equals_quantus_without_noise(gray):
    """Per image, whether the class survives each percentage 1 %..99 % of the pixels
    removed by linear imputation: exactly quantus' curve (its noise set to 0 on both
    sides, as quantus draws from numpy's global generator)."""
    wrapped, model, x, attr, rel = gray
    y = attr.targets[:, 0].numpy()
    ours = cnnscan.evaluate(model, None, attr, ["road"], noise_level=0.0)
    curves = np.array(ours["road_curve"]["predicted"])[:, 0]
    for i in range(len(x)):
        road = quantus.ROAD(noise=0.0, normalise=False, abs=False, disable_warnings=True)
        theirs = road(
            model=wrapped,
            x_batch=x[i : i + 1],
            y_batch=y[i : i + 1],
            a_batch=rel[i : i + 1],
            device="cpu",
        )
        assert np.allclose(list(theirs), np.array(ours["road_curve"]["share"]) * 100)
        assert curves[i].tolist() == list(theirs.values())
    assert 0 < curves.mean() < 1  # the classes do flip
    assert np.allclose(np.array(ours["road"])[:, 0], curves.mean(axis=1))


def test_linear_imputation_equals_quantus():
    from quantus.functions.perturb_func import noisy_linear_imputation

    from cnnscan.metrics.imputation import impute

    gen = torch.Generator().manual_seed(2)
    image = torch.rand((3, 9, 11), generator=gen, dtype=torch.float64)
    removed = torch.rand((9, 11), generator=gen) < 0.6
    theirs = noisy_linear_imputation(
        image.numpy(), np.flatnonzero(removed.numpy().ravel()), noise=0.0
    )
    ours = impute(image, removed, None)
    assert np.allclose(ours.numpy(), theirs, rtol=0, atol=1e-12)
    assert torch.equal(ours[:, ~removed], image[:, ~removed])
    noise = torch.randn((3, int(removed.sum())), generator=gen, dtype=torch.float64)
    noisy = impute(image, removed, noise)
    assert torch.allclose(noisy[:, removed] - ours[:, removed], noise, rtol=0, atol=1e-12)


def test_road_noise_is_seeded(gray):
    _, model, _, attr, _ = gray
    runs = [
        cnnscan.evaluate(model, None, attr, ["road"], noise_level=1.0, steps=10, seed=seed)
        for seed in (1, 1, 2)
    ]
    curves = [run["road_curve"]["predicted"] for run in runs]
    assert curves[0] == curves[1] and curves[0] != curves[2]


def test_sensitivity_n_equals_quantus(gray):
    """48 steps of 3 pixels (quantus: features_in_step 3 on the gray channel), the first
    80 % of them, zero substrate on both sides: every n's correlation agrees to quantus'
    float32 forwards."""
    wrapped, model, x, attr, rel = gray
    metric = quantus.SensitivityN(
        features_in_step=3,
        n_max_percentage=0.8,
        normalise=False,
        abs=False,
        perturb_baseline=0.0,
        return_aggregate=False,
        disable_warnings=True,
    )
    theirs = np.array(
        metric(
            model=wrapped, x_batch=x, y_batch=attr.targets[:, 0].numpy(), a_batch=rel, device="cpu"
        )
    )
    ours = cnnscan.evaluate(model, None, attr, ["sensitivity_n"], steps=48, substrate="zero")
    curve = ours["sensitivity_n_curve"]
    assert curve["n"] == list(range(3, 3 * 38 + 1, 3)) and len(theirs) == 38
    assert np.allclose(curve["pearson"], theirs, rtol=0, atol=1e-5)
    assert ours["sensitivity_n"] == pytest.approx(float(np.mean(theirs)), abs=1e-5)


def test_sensitivity_n_of_one_map_is_undefined(small):
    _, model, _, attr = small
    one = cnnscan.explain(model, attr.inputs[:1], "gradient", targets=[1])
    assert np.isnan(cnnscan.evaluate(model, None, one, ["sensitivity_n"], steps=8)["sensitivity_n"])


def test_relevance_rank_accuracy_equals_quantus(small):
    net, model, x, attr = small
    gen = torch.Generator().manual_seed(4)
    masks = torch.rand((2, 12, 12), generator=gen) < torch.tensor([0.2, 0.5]).view(2, 1, 1)
    ours = cnnscan.evaluate_many(
        model, None, {"gxi": attr}, ["relevance_rank_accuracy"], regions=list(masks)
    )["gxi"]["relevance_rank_accuracy"]
    theirs = quantus.RelevanceRankAccuracy(disable_warnings=True)(
        model=net.float(),
        x_batch=x.float().numpy(),
        y_batch=TARGETS[:, 0].numpy(),
        a_batch=relevance(attr)[:, 0].numpy()[:, None],
        s_batch=masks.numpy()[:, None].astype(float),
        device="cpu",
    )
    net.double()
    assert np.array(ours)[:, 0].tolist() == pytest.approx(theirs, abs=1e-12)
    assert min(theirs) > 0 and max(theirs) < 1


def test_batch_runs_store_the_new_metrics_and_summarize_them_per_method(tmp_path):
    """Rows get one column per metric (equal to evaluating the image alone), the summary
    their means per method; sensitivity-n (one number per attribution) is refused with why."""
    from PIL import Image

    import cnnscan.batch
    from cnnscan.errors import BatchError

    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"noise_{i}.png")
    model = cnnscan.load_model(
        SmallConvNet(), preprocessing=cnnscan.Preprocessing(size=(16, 16), resize_shorter=None)
    )
    metrics = ["infidelity", "avg_sensitivity", "road"]
    results = cnnscan.batch.run(
        tmp_path,
        out=tmp_path / "out",
        model=model,
        methods=["gradient", "gradcam"],
        metrics=metrics,
        progress=False,
    )
    rows = results.rows().to_pylist()
    summary = results.summary()["methods"]
    for row in rows[:2]:
        attr = cnnscan.explain(model, row["path"], row["method"], targets=[row["target"]])
        alone = cnnscan.evaluate(model, row["path"], attr, metrics)
        for metric in metrics:
            assert row[metric] == pytest.approx(alone[metric], rel=1e-4, abs=1e-9), metric
    for method in ("gradient", "gradcam"):
        for metric in metrics:
            values = [r[metric] for r in rows if r["method"] == method]
            assert summary[method][f"mean_{metric}"] == pytest.approx(np.mean(values))
    with pytest.raises(BatchError, match="sensitivity_n does not give one number per image"):
        cnnscan.batch.run(tmp_path, out=tmp_path / "o2", model=model, metrics=["sensitivity_n"])


def test_list_metrics_lists_the_new_metrics_with_their_properties():
    info = {m.name: m for m in cnnscan.metrics.list_metrics()}
    expected = {
        "infidelity": ("faithfulness", False, False, True),
        "road": ("faithfulness", False, False, True),
        "sensitivity_n": ("faithfulness", True, False, False),
        "relevance_rank_accuracy": ("localization", True, True, True),
        "avg_sensitivity": ("robustness", False, False, True),
    }
    for name, (family, higher, region, per_row) in expected.items():
        m = info[name]
        assert (m.family, m.higher_is_better, m.needs_region, m.per_row) == (
            family,
            higher,
            region,
            per_row,
        ), name
        assert m.description and m.cost and m.paper and not m.default
    assert info["avg_sensitivity"].reruns_method and not info["infidelity"].reruns_method
    assert cnnscan.metrics.get_metric("rank_accuracy").name == "relevance_rank_accuracy"
