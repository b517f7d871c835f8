"""Layers: names, per-call capture of reused modules, the layer table, the default layer,
and hooks that always come off."""

from __future__ import annotations

import re
import threading

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import Linear, SmallConvNet, hooks_of
from torch import nn

import cnnscan
from cnnscan import LayerError, Scan
from cnnscan.layers import capture, default_layer, get_module, trace_layers

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


# -- modules called more than once ----------------------------------------------------------------
def small_net_calls(net: SmallConvNet, x: torch.Tensor) -> list[torch.Tensor]:
    """The three outputs of SmallConvNet's shared ReLU module, computed by hand."""
    first = F.relu(net.conv1(x))
    second = F.relu(net.conv2(F.max_pool2d(first, 2)))
    third = F.relu(net.conv3(second))
    return [first, second, third]


def test_reused_module_needs_a_call_index():
    net = SmallConvNet("module")
    with capture(net, ["acts.relu"]) as captured:
        net(X)
    with pytest.raises(LayerError, match=r"3 times.*acts\.relu@0.*acts\.relu@1.*acts\.relu@2"):
        captured["acts.relu"]


def test_each_call_of_a_reused_module_is_its_own_output():
    net = SmallConvNet("module")
    with capture(net, ["acts.relu"]) as captured:
        net(X)
    with torch.no_grad():
        expected = small_net_calls(net, X)
    for call, tensor in enumerate(expected):
        torch.testing.assert_close(captured[f"acts.relu@{call}"], tensor, rtol=0, atol=0)
    with pytest.raises(LayerError, match="does not exist"):
        captured["acts.relu@3"]


def test_module_called_once_needs_no_index_and_accepts_at_zero():
    net = SmallConvNet("module")
    with capture(net, ["conv2"]) as captured:
        net(X)
    with torch.no_grad():
        expected = net.conv2(F.max_pool2d(F.relu(net.conv1(X)), 2))
    torch.testing.assert_close(captured["conv2"], expected, rtol=0, atol=0)
    torch.testing.assert_close(captured["conv2@0"], expected, rtol=0, atol=0)


def test_default_model_swish_calls(default_model, chelsea):
    module = default_model.module
    x = default_model.preprocess(chelsea)
    with capture(module, ["_swish"]) as captured, torch.no_grad():
        logits = module(x)
        with pytest.raises(LayerError, match=r"_swish@0.*_swish@1"):
            captured["_swish"]
        stem = F.relu6(module._bn0(module._conv_stem(x)))
        head = captured["_swish@1"]
    torch.testing.assert_close(captured["_swish@0"], stem, rtol=0, atol=0)
    assert tuple(head.shape) == (1, 1280, 7, 7)
    # The head activation is what the classifier reads: pool + fc gives the logits.
    torch.testing.assert_close(module._fc(head.mean(dim=(2, 3))), logits, rtol=1e-5, atol=1e-5)


def test_scan_activations_of_reused_module(default_model, chelsea):
    scan = Scan(default_model, default_model.preprocess(chelsea))
    with pytest.raises(LayerError, match="_swish@1"):
        scan.activations("_swish")
    head = scan.activations("_swish@1").detach()
    fc = default_model.module._fc
    torch.testing.assert_close(
        fc(head.mean(dim=(2, 3))), scan.logits.detach(), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(LayerError, match="does not exist"):
        scan.activations("_swish@2")


def test_scan_activations_match_hand_computation_on_small_net():
    net = SmallConvNet("module")
    scan = Scan(net, X)
    with torch.no_grad():
        expected = small_net_calls(net, X)
    for call, tensor in enumerate(expected):
        torch.testing.assert_close(scan.activations(f"acts.relu@{call}").detach(), tensor)


# -- unknown names --------------------------------------------------------------------------------
def test_unknown_layer_names_the_closest_and_points_to_the_listing(resnet):
    with pytest.raises(LayerError) as info:
        get_module(resnet, "layer5")
    message = str(info.value)
    assert "no layer named 'layer5'" in message
    close = message.split("Did you mean: ")[1].split("?")[0].split(", ")
    assert "layer4" in close and len(close) <= 5
    assert "fc" not in close  # not a listing of every name
    assert f"`cnnscan layers` lists all {len(list(resnet.named_modules())) - 1}" in message


def test_unknown_layer_in_capture_and_scan(resnet):
    with pytest.raises(LayerError, match="layer4"), capture(resnet, ["layer4.0.conv9"]):
        pass
    assert hooks_of(resnet) == hooks_of(resnet)  # sanity for the helper
    scan = Scan(resnet, torch.zeros(1, 3, 64, 64))
    with pytest.raises(LayerError, match="cnnscan layers"):
        scan.activations("layer9")


def test_layer_error_is_a_key_error_with_a_readable_message(resnet):
    with pytest.raises(KeyError) as info:
        get_module(resnet, "nope")
    assert str(info.value).startswith("no layer named")  # not quoted like a KeyError


@pytest.mark.parametrize("name", ["nothing_like_it", "_blocks.1._bn", "_blocks" + "x" * 300])
def test_unknown_layer_messages_stay_short(default_model, name):
    # the default model has about 300 modules: the message names at most 5, in one line
    with pytest.raises(LayerError) as info:
        get_module(default_model.module, name)
    message = str(info.value)
    assert len(message) <= 400 and "\n" not in message
    assert "`cnnscan layers` lists all" in message
    if "Did you mean" in message:
        assert len(message.split("Did you mean: ")[1].split("?")[0].split(", ")) <= 5


# -- the layer table ------------------------------------------------------------------------------
def test_trace_layers_shapes_and_parameters(resnet):
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    rows = {row.name: row for row in trace_layers(resnet, x)}
    with torch.no_grad():
        stem = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
        layer1 = resnet.layer1(stem)
        layer4 = resnet.layer4(resnet.layer3(resnet.layer2(layer1)))
    assert rows["conv1"].output_shape == (64, 112, 112)
    assert rows["maxpool"].output_shape == tuple(stem.shape[1:]) == (64, 56, 56)
    assert rows["layer1"].output_shape == tuple(layer1.shape[1:])
    assert rows["layer4"].output_shape == tuple(layer4.shape[1:]) == (512, 7, 7)
    assert rows["fc"].output_shape == (1000,)
    # Parameter counts by arithmetic.
    assert rows["conv1"].parameters == 64 * 3 * 7 * 7
    assert rows["bn1"].parameters == 2 * 64
    assert rows["layer1"].parameters == 2 * (2 * 64 * 64 * 3 * 3 + 2 * 2 * 64)
    assert rows["fc"].parameters == 512 * 1000 + 1000
    assert rows["conv1"].type == "Conv2d" and rows["layer1"].type == "Sequential"
    assert rows["conv1"].is_leaf and not rows["layer1"].is_leaf
    assert rows["layer1.0.conv1"].depth == 2
    assert rows["avgpool"].passthrough and not rows["conv1"].passthrough
    # Completion order: a container finishes after its children.
    order = [row.name for row in trace_layers(resnet, x)]
    assert order.index("layer1.1") < order.index("layer1") < order.index("layer2.0.conv1")


def test_trace_layers_names_each_call_of_a_reused_module():
    names = [row.name for row in trace_layers(SmallConvNet("module"), X)]
    assert [n for n in names if n.startswith("acts.relu")] == [
        "acts.relu@0",
        "acts.relu@1",
        "acts.relu@2",
    ]
    assert "conv1" in names and "conv1@0" not in names


def test_trace_layers_of_the_default_model(default_model):
    rows = {
        row.name: row for row in trace_layers(default_model.module, torch.zeros(1, 3, 224, 224))
    }
    assert rows["_swish@0"].output_shape == (32, 112, 112)
    assert rows["_swish@1"].output_shape == (1280, 7, 7)
    assert rows["_conv_head"].parameters == 320 * 1280  # 1×1 conv, no bias
    assert rows["_fc"].parameters == 1280 * 1000 + 1000
    # Every parameter is in exactly one called top-level module or block (`_blocks` is a
    # ModuleList: iterated, never called, so it has no row of its own).
    total = sum(p.numel() for p in default_model.module.parameters())
    called = [r for r in rows.values() if r.depth == 0 or re.fullmatch(r"_blocks\.\d+", r.name)]
    assert "_blocks" not in rows
    assert sum(r.parameters for r in called) == total


# -- the default layer ----------------------------------------------------------------------------
def test_default_layer_of_the_default_model(default_model):
    rows = trace_layers(default_model.module, torch.zeros(1, 3, 224, 224))
    assert default_layer(rows) == "_swish@1"


def test_default_layer_of_resnet18(resnet):
    assert default_layer(trace_layers(resnet, torch.zeros(1, 3, 224, 224))) == "layer4"
    assert Scan(resnet, torch.zeros(1, 3, 224, 224)).default_layer() == "layer4"


def test_default_layer_of_small_net_is_the_last_spatial_call():
    assert default_layer(trace_layers(SmallConvNet("module"), X)) == "acts.relu@2"
    # With functional ReLUs the last spatial module is the last conv.
    assert default_layer(trace_layers(SmallConvNet("functional"), X)) == "conv3"


def test_no_spatial_layer_is_a_clear_error():
    with pytest.raises(LayerError, match="spatial"):
        default_layer(trace_layers(Linear(), torch.zeros(1, 3, 8, 8)))


# -- hooks always come off ------------------------------------------------------------------------
class Explodes(nn.Module):
    """Runs two layers, then raises."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        self.relu(self.conv(x))
        raise RuntimeError("boom in forward")


def test_hooks_removed_after_capture():
    net = SmallConvNet("module")
    before = hooks_of(net)
    with capture(net, ["acts.relu", "conv1"]):
        assert hooks_of(net) != before  # hooks really are attached inside
        net(X)
    assert hooks_of(net) == before


def test_hooks_removed_when_the_forward_raises():
    net = Explodes()
    before = hooks_of(net)
    with pytest.raises(RuntimeError, match="boom"), capture(net, ["conv", "relu"]):
        net(X)
    assert hooks_of(net) == before
    with pytest.raises(RuntimeError, match="boom"):
        trace_layers(net, X)
    assert hooks_of(net) == before
    with pytest.raises(RuntimeError, match="boom"):
        Scan(net, X)
    assert hooks_of(net) == before


def test_user_hooks_stay_and_keep_firing():
    net = SmallConvNet("module")
    fired = []
    handle = net.conv1.register_forward_hook(lambda m, i, o: fired.append(tuple(o.shape)))
    before = hooks_of(net)
    with capture(net, ["conv1"]) as captured:
        net(X)
    assert hooks_of(net) == before
    assert captured["conv1"].shape == (2, 8, 16, 16)
    assert fired == [(2, 8, 16, 16)]
    trace_layers(net, X)
    cnnscan.explain(net, X, "gradient", targets=[0])
    assert hooks_of(net) == before
    handle.remove()


def test_capture_ignores_forwards_of_other_threads():
    net = SmallConvNet("module")
    with capture(net, ["conv1"]) as captured:
        thread = threading.Thread(target=lambda: net(X[:1]))
        thread.start()
        thread.join()
        net(X)
    # Only this thread's forward (batch 2) was recorded: one call, so no `@k` is needed.
    assert captured["conv1"].shape[0] == 2


def test_forwards_after_the_block_are_not_recorded():
    net = SmallConvNet("module")
    with capture(net, ["conv1"]) as captured:
        net(X)
    net(X[:1])
    assert captured["conv1"].shape[0] == 2  # one call recorded: the one inside the block


# -- outputs modified in place later in the forward -----------------------------------------------
def test_capture_is_not_changed_by_later_in_place_ops(resnet):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    block = resnet.layer1[0]
    with torch.no_grad():
        stem = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
        bn1 = resnet.bn1(resnet.conv1(x))
        bn2 = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(stem)))))
    with capture(resnet, ["bn1", "layer1.0.bn2"]) as captured, torch.no_grad():
        resnet(x)
    torch.testing.assert_close(captured["bn1"], bn1)  # ReLU(inplace=True) follows
    torch.testing.assert_close(captured["layer1.0.bn2"], bn2)  # `out += identity` follows


def test_scan_activation_is_not_changed_by_later_in_place_ops(resnet):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    block = resnet.layer1[0]
    with torch.no_grad():
        stem = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
        bn2 = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(stem)))))
    scan = Scan(resnet, x)
    torch.testing.assert_close(scan.activations("layer1.0.bn2").detach(), bn2)


def test_scan_gradient_at_an_overwritten_layer_is_the_gradient_at_that_layer(resnet):
    """Independent reference: a hook swaps the layer's output for a leaf tensor z (handing the
    network a copy, so `out += identity` cannot touch z) and autograd gives d logit / dz."""
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    leaf = {}

    def swap(_module, _inputs, output):
        leaf["z"] = output.detach().requires_grad_(True)
        return leaf["z"].clone()

    handle = resnet.layer1[0].bn2.register_forward_hook(swap)
    try:
        logit = resnet(x)[0, 7]
    finally:
        handle.remove()
    (expected,) = torch.autograd.grad(logit, leaf["z"])
    scan = Scan(resnet, x)
    grads = scan.layer_gradients("layer1.0.bn2", torch.tensor([[7]]))
    torch.testing.assert_close(grads[:, 0], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scan.activations("layer1.0.bn2").detach(), leaf["z"].detach())


def test_a_released_scan_forgets_its_graph_and_runs_it_again_when_asked():
    """After `release` the logits and cached gradients stay; a new gradient request runs the
    forward again and gives the same numbers as before."""
    model = cnnscan.load_model(SmallConvNet())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    scan = Scan(model, x, relu_rules=True)
    targets = scan.targets("top2")
    before = scan.input_gradients(targets)
    layer = scan.default_layer()
    layer_before = scan.layer_gradients(layer, targets)
    logits = scan.logits.detach().clone()
    scan.release()
    assert scan._x is None and scan._captured is None and scan.logits.grad_fn is None
    assert torch.equal(scan.logits, logits)
    assert torch.equal(scan.input_gradients(targets), before)  # cached: no forward
    assert scan._x is None
    guided = scan.input_gradients(targets, "guided")  # needs the graph: forward again
    assert scan._x is not None and guided.shape == before.shape
    scan.release()
    assert torch.equal(scan.layer_gradients(layer, targets), layer_before)
