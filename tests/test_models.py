"""`load_model`: the bundled default, torchvision names, weight files, pickles, labels, and
models that do not return logits."""

from __future__ import annotations

import importlib.util
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import SmallConvNet
from torch import nn

import cnnscan
from cnnscan import ModelError, load_model
from cnnscan.models.labels import imagenet_labels

X8 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


# -- the bundled default ----------------------------------------------------------------------
def test_default_model_metadata(default_model):
    assert default_model.num_classes == 1000
    assert default_model.labels == imagenet_labels()
    assert default_model.preprocessing.size == (224, 224)
    assert not default_model.module.training


def test_default_aliases_and_random_weights(default_model, chelsea):
    x = default_model.preprocess(chelsea)
    random = load_model("default", weights=None)
    assert type(random.module) is type(default_model.module)
    with torch.no_grad():
        assert not torch.allclose(random.module(x), default_model.module(x))


def test_default_model_weights_from_a_file(tmp_path, default_model, chelsea):
    path = tmp_path / "lite0.pth"
    torch.save(default_model.module.state_dict(), path)
    again = load_model("efficientnet-lite0", weights=path)
    x = default_model.preprocess(chelsea)
    with torch.no_grad():
        torch.testing.assert_close(again.module(x), default_model.module(x), rtol=0, atol=0)


# -- names ----------------------------------------------------------------------------------
def test_unknown_name_suggests_close_matches():
    with pytest.raises(ModelError, match="resnet50") as info:
        load_model("resnet5", weights=None)
    assert "unknown model 'resnet5'" in str(info.value)


def test_unrelated_name_has_no_bogus_suggestions():
    with pytest.raises(ModelError, match="unknown model") as info:
        load_model("qqqqqqqq", weights=None)
    assert "Did you mean" not in str(info.value)


def test_torchvision_name_offline_with_torchvision_preprocessing(chelsea):
    model = load_model("resnet18", weights=None)
    assert isinstance(model.module, torchvision.models.ResNet)
    assert not model.module.training
    assert model.num_classes == 1000
    meta = torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"]
    assert list(model.labels) == meta
    # The tensor equals what torchvision's own transforms make of the same picture.
    reference = torchvision.models.ResNet18_Weights.DEFAULT.transforms()(chelsea).unsqueeze(0)
    torch.testing.assert_close(model.preprocess(chelsea), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["efficientnet_b0", "inception_v3"])
def test_other_sizes_and_interpolations_follow_torchvision(name):
    picture = cnnscan.load_image(
        np.random.default_rng(0).integers(0, 256, (301, 257, 3), dtype=np.uint8)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # inception_v3's init notice
        model = load_model(name, weights=None)
    transform = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    reference = transform(picture).unsqueeze(0)
    assert model.preprocess(picture).shape == reference.shape
    torch.testing.assert_close(model.preprocess(picture), reference, rtol=0, atol=1e-6)


def test_names_are_case_insensitive():
    assert isinstance(load_model("ResNet18", weights=None).module, torchvision.models.ResNet)


def test_offline_imagenet_download_says_how_to_pass_a_file(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))  # nothing cached there
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(ModelError) as info:
        load_model("resnet18")  # weights="imagenet" is the default
    message = str(info.value)
    assert "weights=PATH" in message
    assert torchvision.models.ResNet18_Weights.DEFAULT.url in message
    assert "weights=None" in message


def test_cached_imagenet_weights_are_used_offline(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    reference = torchvision.models.resnet18(weights=None)
    (tmp_path / "checkpoints").mkdir()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / Path(url).name)
    model = load_model("resnet18")
    for key, value in reference.state_dict().items():
        assert torch.equal(model.module.state_dict()[key], value), key


# -- weight files -----------------------------------------------------------------------------
@pytest.fixture
def resnet_state():
    return torchvision.models.resnet18(weights=None, num_classes=1000).state_dict()


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model_state_dict", "module_prefix"])
def test_state_dict_files(tmp_path, resnet_state, layout):
    payload = {
        "plain": resnet_state,
        "state_dict": {"state_dict": resnet_state, "epoch": 7},
        "model_state_dict": {"model_state_dict": resnet_state, "optimizer": {}},
        "module_prefix": {f"module.{k}": v for k, v in resnet_state.items()},
    }[layout]
    path = tmp_path / f"{layout}.pt"
    torch.save(payload, path)
    model = load_model("resnet18", weights=path)
    for key, value in resnet_state.items():
        assert torch.equal(model.module.state_dict()[key], value), key


def test_weight_files_are_loaded_with_weights_only(tmp_path, resnet_state, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    torch.save(resnet_state, tmp_path / "w.pth")
    load_model("resnet18", weights=tmp_path / "w.pth")
    assert calls == [True]


def test_wrong_shapes_name_the_tensors(tmp_path, resnet_state):
    resnet_state["fc.weight"] = torch.zeros(10, 512)
    resnet_state["fc.bias"] = torch.zeros(10)
    torch.save(resnet_state, tmp_path / "ten_classes.pt")
    with pytest.raises(ModelError, match=r"fc\.weight \(10, 512\)"):
        load_model("resnet18", weights=tmp_path / "ten_classes.pt")


def test_other_architecture_lists_missing_keys(tmp_path, resnet_state):
    torch.save(resnet_state, tmp_path / "r18.pt")
    with pytest.raises(ModelError, match="missing"):
        load_model("resnet34", weights=tmp_path / "r18.pt")


def test_missing_weights_file(tmp_path):
    with pytest.raises(ModelError, match="no such weights file"):
        load_model("resnet18", weights=tmp_path / "nope.pt")


def test_garbage_weights_file(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError, match="cannot read weights"):
        load_model("resnet18", weights=tmp_path / "junk.pt")


def test_non_tensor_state_dict(tmp_path):
    torch.save({"weights": [1, 2, 3]}, tmp_path / "odd.pt")
    with pytest.raises(ModelError, match="state_dict"):
        load_model("resnet18", weights=tmp_path / "odd.pt")


# -- pickled full models ------------------------------------------------------------------------
def test_pickled_model_needs_trust(tmp_path):
    net = SmallConvNet(classes=5)
    torch.save(net, tmp_path / "full.pt")
    with pytest.raises(ModelError, match="trust_pickle"):
        load_model(tmp_path / "full.pt")
    model = load_model(tmp_path / "full.pt", trust_pickle=True)
    assert model.num_classes == 5
    with torch.no_grad():
        torch.testing.assert_close(model.module(X8), net(X8))


class _Evil:
    def __reduce__(self):
        return (exec, ("import builtins; builtins._cnnscan_pickle_ran = True",))


def test_refused_pickle_runs_no_code(tmp_path):
    import builtins

    torch.save({"payload": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="trust_pickle"):
        load_model(tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="trust_pickle"):
        load_model("resnet18", weights=tmp_path / "evil.pt")
    assert not hasattr(builtins, "_cnnscan_pickle_ran")


def test_pickled_model_given_as_weights_says_what_to_do(tmp_path):
    torch.save(SmallConvNet(), tmp_path / "full.pt")
    with pytest.raises(ModelError, match="trust_pickle=True"):
        load_model("resnet18", weights=tmp_path / "full.pt")


def test_state_dict_given_as_model_says_what_to_do(tmp_path, resnet_state):
    torch.save(resnet_state, tmp_path / "r18.pt")
    with pytest.raises(ModelError, match=r"weights="):
        load_model(tmp_path / "r18.pt")


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        load_model(str(tmp_path / "nope.pth"))


def test_unsupported_source_type():
    with pytest.raises(ModelError, match=r"nn\.Module"):
        load_model(42)


# -- safetensors --------------------------------------------------------------------------------
@pytest.mark.skipif(
    importlib.util.find_spec("safetensors") is None, reason="safetensors not installed"
)
def test_safetensors(tmp_path, resnet_state):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in resnet_state.items()}, tmp_path / "w.safetensors")
    model = load_model("resnet18", weights=tmp_path / "w.safetensors")
    for key, value in resnet_state.items():
        assert torch.equal(model.module.state_dict()[key], value), key


@pytest.mark.skipif(
    importlib.util.find_spec("safetensors") is not None, reason="safetensors is installed"
)
def test_safetensors_without_the_package_says_how_to_install(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match="pip install safetensors"):
        load_model("resnet18", weights=tmp_path / "w.safetensors")


# -- labels ----------------------------------------------------------------------------------------
def test_labels_file(tmp_path):
    names = ["ant", "bee", "cat", "dog", "eel"]
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n\n", encoding="utf-8")
    model = load_model(SmallConvNet(classes=5), labels=tmp_path / "labels.txt")
    assert model.labels == tuple(names)
    (top,) = cnnscan.predict(model, X8[:1], k=5)
    logits = model.module(X8[:1])[0]
    assert [p["label"] for p in top] == [names[i] for i in logits.argsort(descending=True)]


def test_labels_list_and_defaults():
    assert load_model(SmallConvNet(classes=3), labels=["a", "b", "c"]).labels == ("a", "b", "c")
    assert load_model(SmallConvNet(classes=3)).labels == ("class 0", "class 1", "class 2")


def test_wrong_number_of_labels(tmp_path):
    (tmp_path / "labels.txt").write_text("a\nb\n")
    with pytest.raises(ModelError, match="5 outputs but 2 labels"):
        load_model(SmallConvNet(classes=5), labels=tmp_path / "labels.txt")


def test_missing_labels_file(tmp_path):
    with pytest.raises(ModelError, match="labels file"):
        load_model(SmallConvNet(), labels=tmp_path / "nope.txt")


# -- modules that are not well-behaved classifiers ---------------------------------------------
class Returns(nn.Module):
    """A conv stem followed by `kind` of output."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        features = self.conv(x)
        logits = features.mean(dim=(2, 3))
        if self.kind == "logits":
            return logits
        if self.kind == "probabilities":
            return logits.softmax(dim=1)
        if self.kind == "nan":
            return logits * float("nan")
        if self.kind == "inf":
            return logits + float("inf")
        if self.kind == "dict":
            return {"scores": logits}
        if self.kind == "none":
            return None
        if self.kind == "feature_map":
            return features
        if self.kind == "vector":
            return logits.sum(dim=1)
        if self.kind == "tuple":
            return logits, features
        if self.kind == "hf":
            return type("Output", (), {"logits": logits})()
        raise ValueError(self.kind)


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("probabilities", "probabilities"),
        ("nan", "NaN"),
        ("inf", "Inf"),
        ("dict", "dict"),
        ("none", "NoneType"),
        ("feature_map", r"shape \(1, 4, 8, 8\)|shape"),
        ("vector", "shape"),
    ],
)
def test_bad_outputs_give_model_errors(kind, match):
    x = X8[:1]
    with pytest.raises(ModelError, match=match):
        cnnscan.explain(Returns(kind), x, "gradient", targets=[0])
    with pytest.raises(ModelError, match=match):
        cnnscan.predict(Returns(kind), x)


@pytest.mark.parametrize("kind", ["logits", "tuple", "hf"])
def test_logits_in_common_containers_are_accepted(kind):
    torch.manual_seed(0)
    net = Returns(kind)
    x = X8[:1]
    attr = cnnscan.explain(net, x, "gradient", targets=[1])
    reference = x.clone().requires_grad_(True)
    plain = Returns("logits")
    plain.load_state_dict(net.state_dict())
    (expected,) = torch.autograd.grad(plain(reference)[0, 1], reference)
    torch.testing.assert_close(attr.maps[0, 0], expected[0])


def test_module_with_fixed_input_size_and_no_linear_layer():
    class Fixed(nn.Module):
        def forward(self, x):
            return x.reshape(len(x), 3 * 8 * 8)[:, :10] * 1.5

    with pytest.raises(ModelError, match="Preprocessing"):
        load_model(Fixed())
    model = load_model(Fixed(), preprocessing=cnnscan.Preprocessing(size=(8, 8)))
    assert model.num_classes == 10
