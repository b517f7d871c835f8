"""Unit-level explanations (`unit=`): DeconvNet reconstruction of one activation, unit-level
guided backprop and gradient, against a hand-written DeconvNet (transposed filters,
max-unpooling with switches, rectification), captum's Neuron* methods, and the unit's
receptive field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import NeuronDeconvolution, NeuronGradient, NeuronGuidedBackprop
from helpers import assert_unchanged, prepared, snapshot
from torch import nn

import cnnscan
from cnnscan import LayerError, MethodError
from cnnscan.scan import make_scan

METHODS = ("deconvnet", "guided_backprop", "gradient")


class Tiny(nn.Module):
    """conv 3×3 p1 -> ReLU -> max-pool 2 -> conv 3×3 p1 -> ReLU -> GAP -> linear."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = self.relu2(self.conv2(self.pool(self.relu1(self.conv1(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def by_hand(net: Tiny, x: torch.Tensor, channel: int, rule: str, position=None) -> torch.Tensor:
    """Zeiler & Fergus's DeconvNet written out (and the guided / plain gradient variants):
    keep one activation of conv2, transpose conv2, unpool with the max-pool switches,
    apply the ReLU's backward rule, transpose conv1."""
    pre1 = net.conv1(x)
    pooled, switches = F.max_pool2d(F.relu(pre1), 2, return_indices=True)
    acts = net.conv2(pooled)
    if position is None:
        flat = int(acts[0, channel].flatten().argmax())
        position = divmod(flat, acts.shape[-1])
    signal = torch.zeros_like(acts)
    signal[0, channel, position[0], position[1]] = 1.0
    signal = F.conv_transpose2d(signal, net.conv2.weight, padding=1)
    signal = F.max_unpool2d(signal, switches, 2, output_size=pre1.shape[-2:])
    if rule == "deconvnet":
        signal = signal.clamp(min=0)
    elif rule == "guided_backprop":
        signal = signal.clamp(min=0) * (pre1 > 0)
    else:
        signal = signal * (pre1 > 0)
    return F.conv_transpose2d(signal, net.conv1.weight, padding=1).detach()


X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", METHODS)
def test_equals_the_hand_written_reconstruction(method):
    net = Tiny()
    for channel in range(5):
        attr = cnnscan.explain(net, X, method, unit=("conv2", channel))
        torch.testing.assert_close(attr.maps[0, 0], by_hand(net, X, channel, method)[0])


@pytest.mark.filterwarnings("ignore::UserWarning:captum")
@pytest.mark.parametrize(
    ("method", "reference"),
    [
        ("deconvnet", NeuronDeconvolution),
        ("guided_backprop", NeuronGuidedBackprop),
        ("gradient", NeuronGradient),
    ],
)
def test_equals_captum_at_the_chosen_position(method, reference):
    net = Tiny()
    attr = cnnscan.explain(net, X, method, unit=("conv2", 3, (2, 5)))
    expected = reference(net, net.conv2).attribute(X, neuron_selector=(3, 2, 5))
    torch.testing.assert_close(attr.maps[:, 0], expected)
    torch.testing.assert_close(attr.maps[0, 0], by_hand(net, X, 3, method, (2, 5))[0])


def test_result_names_the_unit_and_its_activation(tmp_path):
    net = Tiny()
    attr = cnnscan.explain(net, X, "deconvnet", unit=("conv2", 3))
    with torch.no_grad():
        acts = net.conv2(net.pool(net.relu1(net.conv1(X))))[0, 3]
    row, col = attr.extras["unit_position"][0].tolist()
    assert acts[row, col] == acts.max()
    assert attr.targets.tolist() == [[3]]
    torch.testing.assert_close(attr.scores, acts.max().view(1, 1))
    assert attr.label() == "conv2 channel 3"
    assert attr.layer == "conv2"
    names = sorted(p.name for p in attr.save(tmp_path))
    assert names == ["deconvnet.json", "deconvnet_img0_unit3.npy", "deconvnet_img0_unit3.png"]


def test_each_image_keeps_its_own_strongest_activation():
    net = Tiny()
    batch = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    together = cnnscan.explain(net, batch, "deconvnet", unit=("conv2", 1))
    for i in range(3):
        alone = cnnscan.explain(net, batch[i : i + 1], "deconvnet", unit=("conv2", 1))
        torch.testing.assert_close(together.maps[i], alone.maps[0])
        assert (
            together.extras["unit_position"][i].tolist()
            == alone.extras["unit_position"][0].tolist()
        )
    assert len({tuple(p.tolist()) for p in together.extras["unit_position"]}) > 1


class Deep(nn.Module):
    """conv 3×3 p1 -> ReLU -> max-pool 2 -> conv 3×3 p1 -> ReLU -> conv 3×3 p1: a unit (i, j)
    of conv3 sees input rows 2i-5 .. 2i+6 (12 pixels), columns likewise."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = F.relu(self.conv2(self.pool(F.relu(self.conv1(x)))))
        return self.fc(self.conv3(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("method", METHODS)
def test_non_zero_only_inside_the_receptive_field(method):
    net = Deep()
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(4))
    attr = cnnscan.explain(net, x, method, unit=("conv3", 2))
    field = cnnscan.receptive_fields(net, x)["conv3"]
    for i in range(2):
        row, col = attr.extras["unit_position"][i].tolist()
        assert field.region(row, col) == ((2 * row - 5, 2 * row + 6), (2 * col - 5, 2 * col + 6))
        (top, bottom), (left, right) = field.region(row, col)
        support = attr.maps[i, 0].abs().sum(dim=0) > 0
        inside = torch.zeros_like(support)
        inside[max(0, top) : bottom + 1, max(0, left) : right + 1] = True
        assert support.any()
        assert not (support & ~inside).any(), f"{method}: signal outside the receptive field"
        assert inside.sum() < support.numel() / 4  # the region is a small part of the image


def test_default_model_unit_stays_in_its_receptive_field(default_model, chelsea):
    field = cnnscan.receptive_fields(default_model)["_blocks.5"]
    attr = cnnscan.explain(default_model, chelsea, "deconvnet", unit=("_blocks.5", 7))
    row, col = attr.extras["unit_position"][0].tolist()
    (top, bottom), (left, right) = field.region(row, col)
    assert bottom - top + 1 == 83  # 83 × 83 pixels, jump 16
    support = attr.maps[0, 0].abs().sum(dim=0) > 0
    rows = support.any(dim=1).nonzero().flatten()
    cols = support.any(dim=0).nonzero().flatten()
    assert top <= rows.min() and rows.max() <= bottom
    assert left <= cols.min() and cols.max() <= right
    assert float(attr.scores[0, 0]) > 0


def test_a_reused_module_call_and_a_non_spatial_layer(default_model, chelsea):
    scan = make_scan(default_model, chelsea, [cnnscan.get_method("guided_backprop")])
    head = cnnscan.explain(
        default_model, chelsea, "guided_backprop", unit=("_swish@1", 100), scan=scan
    )
    assert head.layer == "_swish@1" and head.maps.shape == (1, 1, 3, 224, 224)
    # A logit is a unit too: unit=("_fc", c) is the class gradient.
    logit = cnnscan.explain(default_model, chelsea, "gradient", unit=("_fc", 285), scan=scan)
    plain = cnnscan.explain(default_model, chelsea, "gradient", targets=285, scan=scan)
    torch.testing.assert_close(logit.maps, plain.maps)
    torch.testing.assert_close(logit.scores, plain.scores)


def test_smoothgrad_with_a_unit_base_and_no_noise_is_the_unit_map():
    net = Tiny()
    plain = cnnscan.explain(net, X, "deconvnet", unit=("conv2", 4))
    smooth = cnnscan.explain(
        net,
        X,
        "smoothgrad",
        base="deconvnet",
        base_options={"unit": ("conv2", 4)},
        n_samples=2,
        noise_level=0.0,
    )
    torch.testing.assert_close(smooth.maps, plain.maps)
    assert smooth.label() == "conv2 channel 4"


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("unit", "error", "needle"),
    [
        (("conv9", 0), LayerError, "Did you mean: conv2, conv1?"),
        (("conv2", 5), MethodError, r"5 channels \(0\.\.4\)"),
        (("conv2", -1), MethodError, r"0\.\.4"),
        (("conv2", 1, (8, 0)), MethodError, r"8×8 output \(positions: 0\.\.7, 0\.\.7\)"),
        (("conv2", 1, (1,)), MethodError, "positions"),
        (("conv2",), MethodError, r"\(layer, channel\)"),
        ("conv2:1", MethodError, r"\(layer, channel\)"),
        (("conv2", 1.5), MethodError, r"\(layer, channel\)"),
    ],
)
def test_bad_units_are_clear_errors(unit, error, needle):
    with pytest.raises(error, match=needle):
        cnnscan.explain(Tiny(), X, "deconvnet", unit=unit)


def test_methods_without_unit_say_so():
    with pytest.raises(MethodError, match="no option unit"):
        cnnscan.explain(Tiny(), X, "integrated_gradients", unit=("conv2", 1))


@pytest.mark.parametrize("kind", ["copyable", "uncopyable"])
@pytest.mark.parametrize("method", [*METHODS, "gradient_x_input"])
def test_model_unchanged(method, kind):
    net, _ = prepared(kind)
    before = snapshot(net)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    attr = cnnscan.explain(net, x, method, unit=("conv3", 2))
    assert torch.isfinite(attr.maps).all() and attr.maps.shape == (2, 1, 3, 16, 16)
    assert_unchanged(before, net)
    with pytest.raises(MethodError):
        cnnscan.explain(net, x, method, unit=("conv3", 99))
    assert_unchanged(before, net)


def test_from_the_command_line(tmp_path, capsys, default_model, chelsea):
    from cnnscan.cli import main

    argv = ["explain", "sample:chelsea", "--method", "deconvnet", "--out", str(tmp_path)]
    code = main([*argv, "--option", 'unit=["_blocks.5", 7]'])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "deconvnet for _blocks.5 channel 7" in out
    expected = cnnscan.explain(default_model, chelsea, "deconvnet", unit=("_blocks.5", 7))
    saved = np.load(tmp_path / "deconvnet_img0_unit7.npy")
    np.testing.assert_allclose(saved, expected.maps[0, 0].numpy(), rtol=1e-5, atol=1e-7)
    code = main([*argv, "--option", 'unit=["_blocks.5", 500]'])
    assert code == 1 and "has 80 channels (0..79)" in capsys.readouterr().err
