"""The user's model comes back exactly as it was, after every registered method, also when
the method raises midway; and explanations do not depend on the model's train/eval mode."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import FORWARDS, SafetyNet, assert_unchanged, prepared, snapshot
from torch import nn

import cnnscan

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
TARGETS = [1, 3]

# Small settings so that every method runs in well under a second on the tiny net.
SMALL = {"n_samples": 3, "n_steps": 4, "max_steps": 8}
SMALL |= {"window": 8, "stride": 8, "n_masks": 8, "segments": 4, "max_iter": 2}  # perturbation


def small_options(info: cnnscan.MethodInfo) -> dict:
    return {key: value for key, value in SMALL.items() if key in info.options()}


METHODS = [info.name for info in cnnscan.list_methods()]


@pytest.fixture(autouse=True)
def _reset_forward_counter():
    FORWARDS.update(count=0, fail_at=None)
    yield
    FORWARDS.update(count=0, fail_at=None)


@pytest.mark.parametrize("kind", ["copyable", "uncopyable"])
@pytest.mark.parametrize("method", METHODS)
def test_model_unchanged_after_explain(method, kind):
    net, seen = prepared(kind)
    before = snapshot(net)
    x = X.clone()
    info = cnnscan.get_method(method)
    attr = cnnscan.explain(net, x, method, targets=TARGETS, **small_options(info))
    assert torch.isfinite(attr.maps).all()
    assert attr.maps.shape[:2] == (2, 2)
    assert_unchanged(before, net)
    assert torch.equal(x, X), "the input tensor was modified"
    assert seen, "the user's hook should still fire on forwards of the model"


def _count_forwards(method: str, kind: str) -> int:
    net, _ = prepared(kind)
    info = cnnscan.get_method(method)
    FORWARDS.update(count=0, fail_at=None)
    cnnscan.explain(net, X, method, targets=TARGETS, batch_size=4, **small_options(info))
    return FORWARDS["count"]


@pytest.mark.parametrize("kind", ["copyable", "uncopyable"])
@pytest.mark.parametrize("method", METHODS)
def test_model_unchanged_when_a_forward_raises_midway(method, kind):
    total = _count_forwards(method, kind)
    info = cnnscan.get_method(method)
    for fail_at in sorted({2, total} if total >= 2 else {1}):
        net, _ = prepared(kind)
        before = snapshot(net)
        FORWARDS.update(count=0, fail_at=fail_at)
        with pytest.raises(RuntimeError, match="injected failure"):
            # a fixed batch size: the same forwards as counted (no batch-size exploration)
            cnnscan.explain(net, X, method, targets=TARGETS, batch_size=4, **small_options(info))
        FORWARDS.update(fail_at=None)
        assert_unchanged(before, net)
        # ... and the model still works normally afterwards.
        cnnscan.explain(net, X, "gradient", targets=[0])
        assert_unchanged(before, net)


@pytest.mark.parametrize("kind", ["copyable", "uncopyable"])
@pytest.mark.parametrize("method", METHODS)
def test_model_unchanged_when_a_backward_raises(method, kind, monkeypatch):
    net, _ = prepared(kind)
    before = snapshot(net)
    info = cnnscan.get_method(method)
    real_grad = torch.autograd.grad
    calls = {"n": 0}

    def failing_grad(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise RuntimeError("injected failure in backward")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", failing_grad)
    try:
        cnnscan.explain(net, X, method, targets=TARGETS, **small_options(info))
    except RuntimeError as e:
        assert "injected failure" in str(e)
    monkeypatch.setattr(torch.autograd, "grad", real_grad)
    assert_unchanged(before, net)


@pytest.mark.parametrize("kind", ["copyable", "uncopyable"])
@pytest.mark.parametrize("method", METHODS)
def test_train_mode_gives_the_eval_mode_result(method, kind):
    trained, _ = prepared(kind)
    evaluated = prepared("copyable")[0].eval()  # same seed: same weights, eval mode
    info = cnnscan.get_method(method)
    in_train = cnnscan.explain(trained, X, method, targets=TARGETS, **small_options(info))
    in_eval = cnnscan.explain(evaluated, X, method, targets=TARGETS, **small_options(info))
    torch.testing.assert_close(in_train.maps, in_eval.maps)
    with torch.no_grad():
        expected_logits = evaluated(X).gather(1, torch.tensor([TARGETS, TARGETS]))
    torch.testing.assert_close(in_train.scores, expected_logits)


def test_model_and_user_hooks_unchanged_on_the_default_model(default_model, chelsea):
    module = default_model.module
    before = snapshot(module)
    cnnscan.explain(default_model, chelsea, "guided_backprop", targets="top2")
    assert_unchanged(before, module)


def test_second_explain_after_the_user_changes_the_weights_sees_the_change():
    # The working copy must follow the user's parameters, not a stale copy.
    net, _ = prepared("copyable")
    first = cnnscan.explain(net, X, "gradient", targets=[0])
    with torch.no_grad():
        net.fc.weight.mul_(-1)
        net.fc.bias.mul_(-1)
    second = cnnscan.explain(net, X, "gradient", targets=[0])
    torch.testing.assert_close(second.maps, -first.maps)
    net.fc = nn.Linear(8, 5)  # a replaced module
    third = cnnscan.explain(net, X, "gradient", targets=[0])
    reference = copy.deepcopy(net).eval()
    x = X.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference(x)[:, 0].sum(), x)
    torch.testing.assert_close(third.maps[:, 0], expected)


def test_buffer_changes_are_seen_too():
    net, _ = prepared("copyable")
    first = cnnscan.explain(net, X, "gradient", targets=[0])
    with torch.no_grad():
        net.bn2.running_var.mul_(4)
    second = cnnscan.explain(net, X, "gradient", targets=[0])
    assert not torch.allclose(first.maps, second.maps)
    reference = copy.deepcopy(net).eval()
    x = X.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference(x)[:, 0].sum(), x)
    torch.testing.assert_close(second.maps[:, 0], expected)


class InPlaceInput(nn.Module):
    """Normalizes its input in place inside forward, as some exported models do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = x.mul_(2.0)
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_models_that_write_their_input_in_place_leave_the_users_tensor_alone():
    x = X.clone()
    try:
        cnnscan.explain(InPlaceInput(), x, "gradient", targets=[0])
    except RuntimeError as e:  # autograd refuses in-place ops on a leaf: acceptable, loud
        assert "in-place" in str(e)
    assert torch.equal(x, X)


class Leaky(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.LeakyReLU(0.01)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


def by_hand(net: nn.Module) -> torch.Tensor:
    x = X.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net(x)[:, 0].sum(), x)
    return grad


def test_settings_and_parameter_free_modules_changed_by_the_user_are_seen():
    net = Leaky()
    cnnscan.explain(net, X, "gradient", targets=[0])
    net.act.negative_slope = 0.9  # a plain setting, no tensor changes
    torch.testing.assert_close(
        cnnscan.explain(net, X, "gradient", targets=[0]).maps[:, 0], by_hand(net)
    )
    net.act = nn.Tanh()  # a replaced module without parameters
    torch.testing.assert_close(
        cnnscan.explain(net, X, "gradient", targets=[0]).maps[:, 0], by_hand(net)
    )


SEEDED = [info.name for info in cnnscan.list_methods() if "seed" in info.options()]


@pytest.mark.parametrize("method", SEEDED)
def test_seeded_methods_are_deterministic_and_leave_the_global_rng_alone(method):
    net = SafetyNet().eval()
    info = cnnscan.get_method(method)
    options = small_options(info)
    if "baseline" in info.options():
        options["baseline"] = "noise"  # the random one
    if "noise_level" in info.options() and method == "gradient_shap":
        options["noise_level"] = 0.2
    if method == "lime":  # from 3 samples of the few superpixels, seeds 7 and 8 draw the same
        options["n_samples"] = 8
    if method in ("kernel_shap", "shapley_sampling"):  # few superpixels: exact Shapley values
        rows, cols = torch.arange(X.shape[-2]) * 4 // X.shape[-2], torch.arange(X.shape[-1])
        options["segments"] = rows[:, None] * 4 + cols[None, :] * 4 // X.shape[-1]  # 16 cells
    if method in ("internal_influence", "smoothgradcam_pp"):  # the default layer feeds a
        options["layer"] = "conv2"  # linear head: a constant gradient; an earlier layer sees
        # the baseline or the noise
    rng = torch.random.get_rng_state()
    first = cnnscan.explain(net, X, method, targets=TARGETS, seed=7, **options).maps
    torch.manual_seed(12345)  # the global generator must not matter
    again = cnnscan.explain(net, X, method, targets=TARGETS, seed=7, **options).maps
    # Measured batch sizes may differ between runs: equal up to float summation order...
    torch.testing.assert_close(first, again, rtol=1e-5, atol=1e-9)
    other = cnnscan.explain(net, X, method, targets=TARGETS, seed=8, **options).maps
    assert not torch.allclose(first, other, rtol=1e-3, atol=1e-7), "the seed has no effect"
    # ...and bitwise equal at a fixed batch size.
    fixed = [
        cnnscan.explain(net, X, method, targets=TARGETS, seed=7, batch_size=3, **options).maps
        for _ in range(2)
    ]
    assert torch.equal(fixed[0], fixed[1])
    torch.random.set_rng_state(rng)
