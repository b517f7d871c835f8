"""ONNX and Keras 3 models become torch modules every method can explain: small models built
here, saved, loaded with load_model, and compared with the original model's own gradients
(the Keras ones computed by hand on the channels-last Keras model)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import cnnscan
from cnnscan import ModelError, load_model
from cnnscan.models.preprocessing import preset

# Keras' torch backend and the legacy ONNX exporter emit deprecation notices by the hundred.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
TARGETS = [1, 3]
SMALL = {"n_samples": 2, "n_steps": 4, "max_steps": 8}
METHODS = [info.name for info in cnnscan.list_methods() if info.family in ("gradient", "cam")]


def small(method: str) -> dict:
    options = cnnscan.get_method(method).options()
    return {key: value for key, value in SMALL.items() if key in options}


# -- ONNX ------------------------------------------------------------------------------------------
class OnnxNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(6, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = self.relu1(self.bn(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    pytest.importorskip("onnx2torch")
    net = OnnxNet().eval()
    path = tmp_path_factory.mktemp("onnx") / "net.onnx"
    torch.onnx.export(
        net,
        (X[:1],),
        str(path),
        dynamo=False,
        opset_version=17,
        do_constant_folding=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    return net, path


def test_onnx_model_loads_with_its_input_size(onnx_file):
    net, path = onnx_file
    model = load_model(path)
    # the file records only the input size: the rest is assumed, and said so
    assert model.preprocessing == preset("imagenet", (16, 16))
    assert model.preprocessing.origin.startswith("assumed: an ONNX file")
    given = load_model(path, preprocessing="inception").preprocessing
    assert given == preset("inception", (16, 16)) and given.origin == "given: inception"
    assert model.num_classes == 5
    assert not model.module.training
    with torch.no_grad():
        torch.testing.assert_close(model.module(X), net(X))


@pytest.mark.parametrize("method", METHODS)
def test_onnx_explanations_equal_the_originals(onnx_file, method):
    net, path = onnx_file
    model = load_model(path)
    ours = cnnscan.explain(model, X, method, targets=TARGETS, **small(method))
    original = cnnscan.explain(net, X, method, targets=TARGETS, **small(method))
    if ours.layer is not None:  # the default layer is the same operation in both graphs
        assert (ours.layer, original.layer) == ("relu2/Relu", "relu2")
    torch.testing.assert_close(ours.maps, original.maps, rtol=1e-4, atol=1e-6)


def test_onnx_layer_names_work_for_cams(onnx_file):
    net, path = onnx_file
    model = load_model(path)
    ours = cnnscan.explain(model, X, "gradcam", targets=TARGETS, layer="conv2/Conv")
    original = cnnscan.explain(net, X, "gradcam", targets=TARGETS, layer="conv2")
    torch.testing.assert_close(ours.maps, original.maps, rtol=1e-4, atol=1e-6)
    with pytest.raises(cnnscan.LayerError, match="conv2/Conv"):
        cnnscan.explain(model, X, "gradcam", targets=TARGETS, layer="conv2")


def test_damaged_onnx_file(tmp_path):
    pytest.importorskip("onnx2torch")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07 definitely not protobuf" * 5)
    with pytest.raises(ModelError, match="not an ONNX model"):
        load_model(tmp_path / "junk.onnx")


# -- Keras -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("keras was imported with another backend")
    return keras


def build_keras(keras, softmax: bool = False):
    """Conv → BatchNorm → ReLU layer → Conv with fused ReLU → GAP → Dense: channels-last."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(5, activation="softmax" if softmax else None, name="fc")(x)
    model = keras.Model(inputs, outputs)
    bn = model.get_layer("bn")
    bn.moving_mean.assign(keras.random.uniform((4,), -0.5, 0.5, seed=1))
    bn.moving_variance.assign(keras.random.uniform((4,), 0.5, 2.0, seed=2))
    return model


def keras_gradients(model, layer_name: str | None, target: int):
    """By hand, on the Keras model itself: logits, d logit/d input (NCHW), and the layer's
    activation and gradient (NHWC)."""
    x = X.permute(0, 2, 3, 1).clone().requires_grad_(True)
    seen = {}
    handle = None
    if layer_name:
        handle = model.get_layer(layer_name).register_forward_hook(
            lambda _m, _i, out: seen.setdefault("a", out)
        )
    logits = model(x, training=False)
    if handle:
        handle.remove()
    wanted = [x, seen["a"]] if layer_name else [x]
    grads = torch.autograd.grad(logits[:, target].sum(), wanted)
    return logits.detach(), grads[0].permute(0, 3, 1, 2), seen.get("a"), grads[-1]


@pytest.fixture(scope="module")
def keras_file(keras, tmp_path_factory):
    path = tmp_path_factory.mktemp("keras") / "net.keras"
    build_keras(keras, softmax=True).save(path)
    return path


def test_keras_file_loads_as_a_channels_first_module(keras, keras_file):
    model = load_model(keras_file)
    assert model.preprocessing == preset("imagenet", (16, 16))
    assert model.preprocessing.origin.startswith("assumed: a Keras model")
    given = load_model(keras_file, preprocessing="inception,crop=0.875").preprocessing
    assert given.size == (16, 16) and given.crop_fraction == 0.875
    assert model.num_classes == 5
    original = keras.saving.load_model(keras_file)
    assert original.layers[-1].activation is keras.activations.softmax  # the file is unchanged
    with torch.no_grad():
        probabilities = original(X.permute(0, 2, 3, 1), training=False)
        logits = model.module(X)
    # The final softmax is dropped from our copy: the same prediction, as logits.
    torch.testing.assert_close(logits.softmax(dim=1), probabilities, rtol=1e-5, atol=1e-6)


def test_keras_layers_are_named_submodules_with_torch_layout(keras_file, capsys):
    model = load_model(keras_file)
    rows = cnnscan.Scan(model, X).layer_table()
    table = {row.name: row for row in rows}
    assert [r.name for r in rows][:6] == ["conv1", "bn", "relu1", "conv2", "gap", "fc"]
    assert table["conv1"].type == "Conv2D" and table["conv1"].output_shape == (4, 16, 16)
    assert table["conv1"].parameters == 3 * 3 * 3 * 4 + 4
    assert table["gap"].output_shape == (6,)
    assert cnnscan.Scan(model, X).default_layer() == "conv2"
    from cnnscan.cli import main

    assert main(["layers", "--model", str(keras_file), "--image", "sample:coffee"]) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["conv2", "Conv2D"] for line in out.splitlines())


def test_keras_gradient_equals_the_keras_models_own(keras):
    net = build_keras(keras)
    _, expected, _, _ = keras_gradients(net, None, target=3)
    attr = cnnscan.explain(net, X, "gradient", targets=[3])
    torch.testing.assert_close(attr.maps[:, 0], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layer", [None, "relu1", "conv1"])
def test_keras_gradcam_equals_one_computed_by_hand(keras, layer):
    net = build_keras(keras)
    name = layer or "conv2"
    _, _, acts, grads = keras_gradients(net, name, target=1)  # NHWC
    weights = grads.mean(dim=(1, 2), keepdim=True)
    expected = torch.relu((weights * acts).sum(dim=-1))
    attr = cnnscan.explain(net, X, "gradcam", targets=[1], layer=layer)
    assert attr.layer == name
    torch.testing.assert_close(attr.maps[:, 0, 0], expected, rtol=1e-4, atol=1e-6)


def test_keras_cam_reads_the_dense_weights(keras):
    net = build_keras(keras)
    acts = {}
    handle = net.get_layer("conv2").register_forward_hook(lambda _m, _i, o: acts.setdefault("a", o))
    with torch.no_grad():
        net(X.permute(0, 2, 3, 1), training=False)
    handle.remove()
    kernel = net.get_layer("fc").kernel.value.detach()  # (channels, classes)
    expected = torch.einsum("nhwc,c->nhw", acts["a"], kernel[:, 2])
    attr = cnnscan.explain(net, X, "cam", targets=[2])
    torch.testing.assert_close(attr.maps[:, 0, 0], torch.relu(expected), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_a_keras_model_and_leaves_it_alone(keras, keras_file, method):
    model = load_model(keras_file)
    before = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    hooks = {id(layer): len(layer._forward_hooks) for layer in model.module.keras_model.layers}
    attr = cnnscan.explain(model, X, method, targets=TARGETS, **small(method))
    assert torch.isfinite(attr.maps).all() and attr.maps.abs().sum() > 0
    for key, value in model.module.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert hooks == {
        id(layer): len(layer._forward_hooks) for layer in model.module.keras_model.layers
    }


def test_keras_model_passed_directly_is_not_modified(keras):
    net = build_keras(keras, softmax=True)
    with pytest.raises(ModelError, match="probabilities"):
        cnnscan.explain(net, X, "gradient", targets=[0])
    assert net.layers[-1].activation is keras.activations.softmax


def test_keras_application_with_a_nested_model(keras):
    keras.utils.set_random_seed(0)
    inner = keras.Sequential(
        [keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3, padding="same", name="c")],
        name="block",
    )
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.ReLU(name="act")(inner(inputs))
    outputs = keras.layers.Dense(3, name="fc")(keras.layers.GlobalAveragePooling2D()(x))
    net = keras.Model(inputs, outputs)
    model = load_model(net)
    names = [name for name, _ in model.module.named_modules()]
    assert {"block", "block.c", "act", "fc"} <= set(names)
    _, _, acts, grads = keras_gradients(net, "act", target=2)
    expected = torch.relu((grads.mean(dim=(1, 2), keepdim=True) * acts).sum(dim=-1))
    attr = cnnscan.explain(model, X, "gradcam", targets=[2], layer="act")
    torch.testing.assert_close(attr.maps[:, 0, 0], expected, rtol=1e-4, atol=1e-6)
    inner_attr = cnnscan.explain(model, X, "gradcam", targets=[2], layer="block.c")
    assert inner_attr.maps.shape == (2, 1, 1, 16, 16)


def test_damaged_keras_file(keras, tmp_path):
    (tmp_path / "junk.keras").write_text("not a zip archive")
    with pytest.raises(ModelError, match="not a Keras model"):
        load_model(tmp_path / "junk.keras")


def test_keras_lambda_layers_need_trust(keras, tmp_path):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0, name="double")(inputs)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
    keras.Model(inputs, outputs).save(tmp_path / "lambda.keras")
    with pytest.raises(ModelError, match="trust_pickle"):
        load_model(tmp_path / "lambda.keras")
    model = load_model(tmp_path / "lambda.keras", trust_pickle=True)
    assert model.num_classes == 2
    assert "double_layer" in dict(model.module.named_modules())  # clashes with Module.double


def test_keras_routing_hooks_act_only_in_their_own_forward(keras):
    # Two forwards of one KerasModule at the same time (threads sharing a working copy, or
    # as here, one forward nested in another): each layer output goes through its submodule
    # once per forward, never through the hooks the other forward installed.
    module = load_model(build_keras(keras)).module
    calls = []
    module.get_submodule("relu1").register_forward_hook(lambda *_: calls.append(1))
    nested = []

    def forward_inside(_layer, _inputs, _output):
        if not nested:
            nested.append(None)
            nested[0] = module(X)

    handle = module.keras_model.get_layer("conv1").register_forward_hook(forward_inside)
    try:
        outer = module(X)
    finally:
        handle.remove()
    assert len(calls) == 2
    torch.testing.assert_close(nested[0], outer)


def test_a_model_file_with_separate_weights_is_refused(onnx_file):
    _, path = onnx_file
    with pytest.raises(ModelError, match="carries its own weights"):
        load_model(path, weights=path.with_suffix(".pt"))
