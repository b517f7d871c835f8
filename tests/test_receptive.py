"""Receptive fields: hand-computed values on small nets, VGG16's published values, and the
support of d unit / d input (the definition) on nets with branches, reused modules,
asymmetric padding, gates and channels-last blocks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import SmallConvNet
from torch import nn

from cnnscan.receptive import receptive_fields, trace_receptive_fields


class Hand(nn.Module):
    """conv 3×3 p1 -> maxpool 2 -> conv 3×3 p2 dilation 2 -> conv (1×5) stride 2 p(0, 2)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.conv3 = nn.Conv2d(4, 4, (1, 5), stride=2, padding=(0, 2))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.conv3(self.conv2(self.pool(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_hand_computed_net():
    fields = receptive_fields(Hand(), torch.zeros(1, 3, 32, 32))
    # conv1: unit i sees pixels i-1..i+1 (3 wide, jump 1).
    assert fields["conv1"].region(5, 7) == ((4, 6), (6, 8))
    assert fields["conv1"].size == (3, 3) and fields["conv1"].jump == (1, 1)
    # pool: unit i covers conv1 units 2i, 2i+1 -> pixels 2i-1..2i+2 (4 wide, jump 2).
    assert fields["pool"].region(3, 0) == ((5, 8), (-1, 2))
    assert fields["pool"].size == (4, 4) and fields["pool"].jump == (2, 2)
    # conv2 (3 taps, dilation 2, padding 2): pool units i-2..i+2 -> pixels 2i-5..2i+6 (12).
    assert fields["conv2"].region(4, 4) == ((3, 14), (3, 14))
    assert fields["conv2"].size == (12, 12) and fields["conv2"].jump == (2, 2)
    # conv3 (1×5, stride 2, padding (0, 2)): rows unchanged in size, columns see conv2 units
    # 2j-2..2j+2 -> 12 + 4·2 = 20 pixels; jump 4.
    assert fields["conv3"].size == (12, 20) and fields["conv3"].jump == (4, 4)
    assert fields["conv3"].region(1, 1) == ((-1, 10), (-5, 14))
    # fc reads the mean over all 8×8 conv3 units.
    assert fields["fc"].size == (12 + 7 * 4, 20 + 7 * 4)
    assert fields["fc"].shared


def test_each_call_of_a_reused_module():
    # SmallConvNet's ReLU runs 3 times: after conv1 (3), after pool + conv2 (4 + 2·2 = 8),
    # after conv3 (8 + 2·2 = 12).
    fields = receptive_fields(SmallConvNet("module"), torch.zeros(1, 3, 16, 16))
    assert [fields[f"acts.relu@{k}"].size for k in range(3)] == [(3, 3), (8, 8), (12, 12)]
    assert [fields[f"acts.relu@{k}"].jump for k in range(3)] == [(1, 1), (2, 2), (2, 2)]
    assert "acts.relu" not in fields


@pytest.mark.parametrize("form", ["functional", "method_inplace", "relu6_functional"])
def test_functional_activations_are_followed(form):
    fields = receptive_fields(SmallConvNet(form), torch.zeros(1, 3, 16, 16))
    assert fields["conv3"].size == (12, 12)


# Published values (e.g. Araujo et al., Distill 2019; the VGG paper's 3×3 stacks).
VGG16 = {
    "features.0": 3,  # conv1_1
    "features.2": 5,  # conv1_2
    "features.4": 6,  # pool1
    "features.7": 14,  # conv2_2
    "features.9": 16,  # pool2
    "features.14": 40,  # conv3_3
    "features.16": 44,  # pool3
    "features.21": 92,  # conv4_3
    "features.23": 100,  # pool4
    "features.28": 196,  # conv5_3
    "features.30": 212,  # pool5
}


def test_vgg16_published_values():
    with torch.device("meta"):  # the geometry needs no weights: build it without memory
        model = torchvision.models.vgg16()
    fields = receptive_fields(model, torch.zeros(1, 3, 224, 224))
    for layer, size in VGG16.items():
        assert fields[layer].size == (size, size), layer
    assert fields["features.28"].jump == (16, 16)
    assert fields["features.30"].jump == (32, 32)
    assert fields["avgpool"].size == (212, 212)  # 7×7 -> 7×7 adaptive pooling: identity


# -- the definition: support of d unit / d input ------------------------------------------------
class SE(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, 4, 1)
        self.expand = nn.Conv2d(4, channels, 1)

    def forward(self, x):
        gate = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(gate))))


class ChannelsLast(nn.Module):
    """ConvNeXt-style: depthwise 7×7, then LayerNorm and MLP on (N, H, W, C), residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.up = nn.Linear(channels, 2 * channels)
        self.down = nn.Linear(2 * channels, channels)

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.down(F.gelu(self.up(y))).permute(0, 3, 1, 2)
        return x + y


class Zoo(nn.Module):
    """Asymmetric ('same') padding, a residual block with a strided projection, a module
    called twice, an inception-style concat of non-square and dilated branches, strided
    slicing, average pooling with padding, a channels-last block and a gate."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2)
        self.branch = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.project = nn.Conv2d(8, 8, 1, stride=2)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.wide = nn.Conv2d(8, 4, (1, 7), padding=(0, 3))
        self.tall = nn.Conv2d(8, 4, (7, 1), padding=(3, 0))
        self.dilated = nn.Conv2d(8, 4, 3, padding=2, dilation=2)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.block = ChannelsLast(12)
        self.se = SE(12)
        self.fc = nn.Linear(12 * 4, 5)

    def forward(self, x):
        x = F.relu(self.stem(F.pad(x, (0, 1, 0, 1))))  # TF "same": one extra row/col after
        x = F.relu(self.branch(x) + self.project(x))
        x = self.shared(F.relu(self.shared(x)))
        x = torch.cat([self.wide(x), self.tall(x), self.dilated(self.pool(x))], dim=1)
        x = x[:, :, 1::2, ::2]
        x = F.avg_pool2d(self.block(x), 3, stride=1, padding=1)
        x = self.se(x)
        return self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))


def positive_copy(net: nn.Module) -> nn.Module:
    """Same geometry, no cancellation: random positive weights of average size 1 / fan-in,
    zero biases, identity batch norms, max pooling as average pooling (every window element
    gets gradient), ReLU6 as ReLU (no saturation)."""
    net = copy.deepcopy(net).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            weights = (0.5 + torch.rand(p.shape, generator=generator, dtype=p.dtype)) / fan_in
            p.copy_(torch.zeros_like(p) if name.endswith("bias") else weights)
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
    for parent in list(net.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.MaxPool2d):
                pool = nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode)
                setattr(parent, child_name, pool)
            elif isinstance(child, nn.ReLU6):
                setattr(parent, child_name, nn.ReLU())
    return net


class Probe:
    """One forward of an all-ones input through a positive copy of a net, every module
    output recorded; `support(layer, call)` gives the rows and columns of the input that
    unit (H/2, W/2) of that output (all channels; 2-D outputs: all features) depends on,
    by autograd. Outputs of the channels-last block's norm and MLP are (N, H, W, C)."""

    def __init__(self, net: nn.Module, size: int):
        self.net = positive_copy(net)
        self.outputs: dict[str, list[torch.Tensor]] = {}
        handles = [
            module.register_forward_hook(
                lambda m, i, o, name=name: self.outputs.setdefault(name, []).append(o)
            )
            for name, module in self.net.named_modules()
            if name
        ]
        self.x = torch.ones(1, 3, size, size, requires_grad=True)
        try:
            self.net(self.x)
        finally:
            for handle in handles:
                handle.remove()

    def support(self, layer: str, call: int):
        out = self.outputs[layer][call]
        if layer in ("block.norm", "block.up", "block.down"):
            out = out.permute(0, 3, 1, 2)
        if out.ndim == 4:
            unit = (out.shape[2] // 2, out.shape[3] // 2)
            seed = out[0, :, unit[0], unit[1]].sum()
        else:
            unit, seed = (0, 0), out.sum()
        (grad,) = torch.autograd.grad(seed, self.x, retain_graph=True)
        support = grad[0].abs().sum(dim=0) > 0
        rows = support.any(dim=1).nonzero().flatten()
        cols = support.any(dim=0).nonzero().flatten()
        return unit, (int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))


def clipped(interval, size):
    return max(0, int(interval[0])), min(size - 1, int(interval[1]))


def assert_matches_gradient_support(net, size, layers=None):
    probe = Probe(net, size)
    rows = trace_receptive_fields(net.eval(), torch.zeros(1, 3, size, size))
    checked = 0
    for row, field in rows:
        if row.output_shape is None or (layers is not None and row.name not in layers):
            continue
        name, _, call = row.name.partition("@")
        unit, support_rows, support_cols = probe.support(name, int(call or 0))
        region_rows, region_cols = field.region(*unit)
        assert (clipped(region_rows, size), clipped(region_cols, size)) == (
            support_rows,
            support_cols,
        ), f"{row.name}: {field}"
        checked += 1
    return checked


def test_zoo_matches_the_gradient_support():
    torch.manual_seed(0)
    checked = assert_matches_gradient_support(Zoo(), size=160)
    assert checked >= 18


def test_zoo_values():
    fields = receptive_fields(Zoo(), torch.zeros(1, 3, 96, 96))
    # stem 3×3 s2 after padding (0, 1): unit 0 sees pixels 0..2.
    assert fields["stem"].region(0, 0) == ((0, 2), (0, 2))
    # Residual: the 3×3 branch (3 + 2·2 = 7) covers the 1×1 projection (3).
    assert fields["branch"].size == (7, 7) and fields["project"].size == (3, 3)
    assert fields["shared@1"].size == (7 + 2 * 4 * 2, 7 + 2 * 4 * 2)
    assert fields["wide"].size == (23, 23 + 6 * 4) and fields["tall"].size == (23 + 6 * 4, 23)
    assert fields["se"].shared  # the gate mixes every position


@pytest.mark.slow
def test_resnet18_and_the_default_model_match_the_gradient_support(default_model):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None)
    layers = {"maxpool", "layer1.1", "layer2.0.downsample", "layer2.1"}
    assert assert_matches_gradient_support(resnet, 160, layers) == len(layers)
    layers = {"_conv_stem", "_blocks.1._swish@1", "_blocks.3", "_blocks.5"}
    assert assert_matches_gradient_support(default_model.module, 224, layers) == len(layers)


def test_default_model(default_model):
    fields = receptive_fields(default_model)
    assert fields["_swish@0"].size == (3, 3)
    assert fields["_swish@1"].size == (851, 851) and fields["_swish@1"].jump == (32, 32)
    assert all(field.known for field in fields.values())


class Rolling(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.after = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.after(torch.roll(self.conv(x), 1, dims=3)).mean(dim=(2, 3))


def test_unknown_operations_are_reported_not_guessed():
    fields = receptive_fields(Rolling(), torch.zeros(1, 3, 16, 16))
    assert fields["conv"].size == (3, 3)
    assert not fields["after"].known and "roll" in fields["after"].note
    assert fields["after"].describe() == "?"
    with pytest.raises(ValueError, match="unknown"):
        fields["after"].region()


def test_a_model_built_on_the_meta_device_runs_shape_only():
    with torch.device("meta"):
        net = Hand()
    on_meta = receptive_fields(net, torch.zeros(1, 3, 32, 32, device="meta"))
    assert on_meta == receptive_fields(Hand(), torch.zeros(1, 3, 32, 32))
