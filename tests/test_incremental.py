"""Incremental inference and graph folding against plain full forwards of the same model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import SmallConvNet
from torch import nn

from cnnscan.engine.folding import folded
from cnnscan.engine.incremental import Boxed, patched_forward
from cnnscan.engine.working_copy import runnable


def random_boxes(batch: int, size: int, box: int, seed: int = 0):
    """Boxes at random places plus the four corners (the borders are where boxes shift)."""
    gen = torch.Generator().manual_seed(seed)
    top = torch.randint(0, size - box + 1, (batch,), generator=gen)
    left = torch.randint(0, size - box + 1, (batch,), generator=gen)
    corners = min(batch, 4)
    top[:corners] = torch.tensor([0, 0, size - box, size - box])[:corners]
    left[:corners] = torch.tensor([0, size - box, 0, size - box])[:corners]
    return top, left, torch.randn(batch, 3, box, box, generator=gen)


def full_copies(x: torch.Tensor, top, left, patches) -> torch.Tensor:
    copies = x.repeat(len(top), 1, 1, 1)
    box = patches.shape[-1]
    for b in range(len(top)):
        copies[b, :, top[b] : top[b] + box, left[b] : left[b] + box] = patches[b]
    return copies


def check(model: nn.Module, size: int, box: int, batch: int = 6, tolerance: float = 1e-4):
    model.eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    top, left, patches = random_boxes(batch, size, box)
    with runnable(model) as runner, torch.no_grad():
        forward = patched_forward(runner, x.contiguous(memory_format=torch.channels_last))
        assert forward is not None, "the model should trace"
        ours = forward(top, left, patches)
        expected = model(full_copies(x, top, left, patches))
        torch.testing.assert_close(forward.logits, model(x), atol=tolerance, rtol=tolerance)
    scale = float(expected.abs().max())
    torch.testing.assert_close(ours, expected, atol=tolerance * scale, rtol=tolerance)
    return forward


@pytest.mark.parametrize(
    ("name", "size", "box"),
    [
        ("resnet18", 64, 9),  # max pooling, residual adds, strided convs
        ("mobilenet_v2", 64, 7),  # depthwise convs, ReLU6, inverted residuals
        ("squeezenet1_1", 64, 5),  # ceil-mode pooling (runs whole), concatenation
    ],
)
def test_patched_copies_equal_full_forwards(name, size, box):
    torch.manual_seed(0)
    check(getattr(torchvision.models, name)(weights=None), size, box)


class EveryLocalOp(nn.Module):
    """The other local operations the boxes follow: 'same' and dilated convolutions,
    asymmetric F.pad, average pooling, BatchNorm (folded), concatenation, scalar and
    per-channel arithmetic, and a spatial constant that forces full tensors."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 6, 3, padding="same")
        self.b = nn.Conv2d(3, 4, 3, padding=2, dilation=2)
        self.bn = nn.BatchNorm2d(10)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)
        self.c = nn.Conv2d(10, 8, 4, stride=2)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.position = nn.Parameter(torch.randn(1, 8, 1, 9) * 0.1)  # 9 wide at 40 px
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = (x - 0.1) / 0.9
        x = torch.cat([F.silu(self.a(x)), torch.sigmoid(self.b(x))], dim=1)
        x = self.pool(F.relu(self.bn(x)))
        x = self.c(F.pad(x, (0, 1, 1, 0))) * self.scale + 0.5
        x = x + self.position  # varies along the width: from here on, full tensors
        return self.fc(x.mean(dim=(2, 3)))


def test_patched_copies_equal_full_forwards_through_every_local_op():
    forward = check(EveryLocalOp(), 40, 6, batch=8)
    # everything up to the position term ran on boxes; that term varies over the map, so
    # from there on the copies are full tensors
    assert {"sub", "a", "b", "cat", "bn", "pool", "pad", "c", "mul", "add"} <= forward.boxed
    assert "add_1" not in forward.boxed


@pytest.mark.slow
def test_patched_copies_equal_full_forwards_on_the_default_model(default_model):
    forward = check(default_model.module, 224, 16, batch=5, tolerance=2e-5)
    # boxes stay small until the 14×14 stage: most of the work there is skipped
    assert sum(1 for node in forward.nodes if node in forward.clean) > 90


def test_a_batch_of_one_does_not_overwrite_the_clean_activations():
    net = SmallConvNet().eval()
    x = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    with runnable(net) as runner:
        forward = patched_forward(runner, x)
        copies = [random_boxes(1, 24, 6, seed) for seed in range(4)]
        first = [forward(*c) for c in copies]
        again = [forward(*c) for c in copies]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        expected = net(torch.cat([full_copies(x, *c) for c in copies]))
    torch.testing.assert_close(torch.cat(first), expected, atol=1e-5, rtol=1e-5)


def test_window_reads_clean_values_padding_and_the_box():
    clean = torch.arange(16.0).view(1, 1, 4, 4)
    boxed = Boxed(clean, -torch.ones(2, 1, 2, 2), torch.tensor([0, 2]), torch.tensor([1, 2]))
    window = boxed.window(torch.tensor([-1, 1]), torch.tensor([0, 1]), 3, 3, fill=9.0)
    assert window.tolist() == [
        [[[9, 9, 9], [0, -1, -1], [4, -1, -1]]],
        [[[5, 6, 7], [9, -1, -1], [13, -1, -1]]],
    ]
    full = boxed.full()
    assert full[0, 0].tolist() == [[0, -1, -1, 3], [4, -1, -1, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert torch.equal(clean, torch.arange(16.0).view(1, 1, 4, 4))


class Hooked(SmallConvNet):
    def __init__(self):
        super().__init__()
        self.conv2.register_forward_hook(lambda m, i, o: o * 2)  # changes the output


class OverwritesALaterInput(nn.Module):
    """`y` is changed in place after `z` was taken from it, and read again later."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        z = y * 2
        y.relu_()
        return self.fc((y + z).mean(dim=(2, 3)))


class DataDependent(SmallConvNet):
    def forward(self, x):
        return super().forward(x) if float(x.sum()) > -1e9 else -super().forward(x)


@pytest.mark.parametrize("net_class", [Hooked, OverwritesALaterInput, DataDependent])
def test_models_the_boxes_cannot_follow_run_whole(net_class):
    net = net_class().eval()
    with runnable(net) as runner:
        assert patched_forward(runner, torch.randn(1, 3, 16, 16)) is None


class Padded(nn.Module):
    """Zero paddings before unpadded convolutions (a module and a functional one), a padding
    feeding two users and an asymmetric padding: only the first two may fold."""

    def __init__(self):
        super().__init__()
        self.pad = nn.ZeroPad2d(1)
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.conv3 = nn.Conv2d(8, 4, 3)
        self.conv4 = nn.Conv2d(4, 4, 2)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.conv1(self.pad(x)).relu()
        x = self.conv2(F.pad(x, (2, 2, 2, 2)))
        shared = F.pad(x, (1, 1, 1, 1))
        x = self.conv3(shared) + shared.mean()
        return self.bn(self.conv4(F.pad(x, (0, 1, 0, 1))))


def test_folding_batchnorm_and_padding_keeps_the_function():
    torch.manual_seed(0)
    model = Padded().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    traced = folded(model)
    pads = [n for n in traced.graph.nodes if n.target is F.pad or n.target == "pad"]
    assert len(pads) == 2  # the shared and the asymmetric padding stay
    kinds = [
        type(traced.get_submodule(n.target)) for n in traced.graph.nodes if n.op == "call_module"
    ]
    assert nn.BatchNorm2d not in kinds
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=1e-4)
    assert all(not n.startswith("_cnnscan") for n, _ in model.named_buffers())  # model untouched
