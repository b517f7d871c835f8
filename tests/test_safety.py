"""The user's model comes back exactly as it was, after every registered method, also when
the method raises midway; and explanations do not depend on the model's train/eval mode."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_globals

import cnnscan

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
TARGETS = [1, 3]

# Small settings so that every method runs in well under a second on the tiny net.
SMALL = {"n_samples": 3, "n_steps": 4, "max_steps": 8}
SMALL |= {"window": 8, "stride": 8, "n_masks": 8, "segments": 4}  # perturbation methods


def small_options(info: cnnscan.MethodInfo) -> dict:
    return {key: value for key, value in SMALL.items() if key in info.options()}


METHODS = [info.name for info in cnnscan.list_methods()]

# Forwards of the user's module: counted outside the module so that working copies share it.
_forwards = {"count": 0, "fail_at": None}


def _tick() -> None:
    _forwards["count"] += 1
    if _forwards["fail_at"] is not None and _forwards["count"] >= _forwards["fail_at"]:
        raise RuntimeError(f"injected failure in forward {_forwards['count']}")


class SafetyNet(nn.Module):
    """In-place ReLUs, BatchNorm, dropout, a reused module, a residual add, a linear head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout2d(0.3)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv4 = nn.Conv2d(8, 8, 3, padding=1)
        self.head_drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():  # non-trivial BatchNorm statistics
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        _tick()
        x = self.drop(self.relu(self.bn1(self.conv1(x))))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        x = self.relu(self.conv3(x)) + x
        x = self.relu(self.conv4(x))  # the default layer: relu@3 feeds pooling + fc
        return self.fc(self.head_drop(x.mean(dim=(2, 3))))


class UncopyableNet(SafetyNet):
    """Holds a lock, so it cannot be deep-copied: cnnscan has to borrow the user's module."""

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.lock = threading.Lock()


def prepared(kind: str) -> tuple[nn.Module, list]:
    """A net as a user might hold it mid-training: train mode, a frozen layer, a hook."""
    net = (SafetyNet if kind == "copyable" else UncopyableNet)()
    if kind == "uncopyable":
        with pytest.raises(TypeError):
            copy.deepcopy(net)
    net.train()
    net.conv1.weight.requires_grad_(False)
    net.bn1.requires_grad_(False)
    net.drop.eval()  # one submodule in another mode than its parent
    seen = []
    net.bn2.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    return net, seen


def hooks_of(root: nn.Module) -> dict:
    state = {
        name: tuple(
            tuple(getattr(m, attr).items())
            for attr in (
                "_forward_hooks",
                "_forward_pre_hooks",
                "_backward_hooks",
                "_backward_pre_hooks",
                "_state_dict_hooks",
                "_load_state_dict_pre_hooks",
            )
        )
        for name, m in root.named_modules()
    }
    state["<global>"] = (
        tuple(module_globals._global_forward_hooks),
        tuple(module_globals._global_forward_pre_hooks),
        tuple(module_globals._global_backward_hooks),
    )
    return state


def snapshot(net: nn.Module) -> dict:
    """Everything explain must leave alone."""
    return {
        "state": {k: v.detach().clone() for k, v in net.state_dict(keep_vars=True).items()},
        "tensors": {k: (id(v), v.data_ptr()) for k, v in net.state_dict(keep_vars=True).items()},
        "training": {name: m.training for name, m in net.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in net.named_parameters()},
        "grads": {name: p.grad for name, p in net.named_parameters()},
        "inplace": {name: m.inplace for name, m in net.named_modules() if hasattr(m, "inplace")},
        "hooks": hooks_of(net),
        "memory_format": {
            name: p.is_contiguous() for name, p in net.named_parameters() if p.ndim == 4
        },
        "modules": {name: id(m) for name, m in net.named_modules()},
        "grad_enabled": torch.is_grad_enabled(),
        "function_modes": torch._C._len_torch_function_stack(),
        "rng": torch.random.get_rng_state(),
    }


def assert_unchanged(before: dict, net: nn.Module) -> None:
    after = snapshot(net)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        # bitwise: same dtype, shape and bytes (NaN-safe)
        other = after["state"][key]
        assert other.dtype == value.dtype and other.shape == value.shape, key
        assert torch.equal(other.view(-1).view(torch.uint8), value.view(-1).view(torch.uint8)), key
    for field in ("tensors", "training", "requires_grad", "inplace", "hooks", "memory_format"):
        assert after[field] == before[field], field
    assert all(g is None for g in after["grads"].values()), "gradients leaked into .grad"
    assert after["modules"] == before["modules"]
    assert after["grad_enabled"] == before["grad_enabled"]
    assert after["function_modes"] == before["function_modes"] == 0
    assert torch.equal(after["rng"], before["rng"]), "the global random state was consumed"


@pytest.fixture(autouse=True)
def _reset_forward_counter():
    _forwards.update(count=0, fail_at=None)
    yield
    _forwards.update(count=0, fail_at=None)


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
    _forwards.update(count=0, fail_at=None)
    cnnscan.explain(net, X, method, targets=TARGETS, batch_size=4, **small_options(info))
    return _forwards["count"]


@pytest.mark.parametrize("kind", ["copyable", "uncopyable"])
@pytest.mark.parametrize("method", METHODS)
def test_model_unchanged_when_a_forward_raises_midway(method, kind):
    total = _count_forwards(method, kind)
    info = cnnscan.get_method(method)
    for fail_at in sorted({2, total} if total >= 2 else {1}):
        net, _ = prepared(kind)
        before = snapshot(net)
        _forwards.update(count=0, fail_at=fail_at)
        with pytest.raises(RuntimeError, match="injected failure"):
            # a fixed batch size: the same forwards as counted (no batch-size exploration)
            cnnscan.explain(net, X, method, targets=TARGETS, batch_size=4, **small_options(info))
        _forwards.update(fail_at=None)
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
    if method == "kernel_shap":  # few superpixels give exact Shapley values: no seed in them
        rows, cols = torch.arange(X.shape[-2]) * 4 // X.shape[-2], torch.arange(X.shape[-1])
        options["segments"] = rows[:, None] * 4 + cols[None, :] * 4 // X.shape[-1]  # 16 cells
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
