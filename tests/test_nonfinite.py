"""Issue 16, item 5: a model that computes NaN where its logits do not look (a channel the
head ignores) used to give CAMs that were 100 % NaN, and Eigen-CAM a raw torch._LinAlgError;
every map now leaves a method finite or as an error naming the layer where NaN appears."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_unchanged, snapshot
from torch import nn

import cnnscan
from cnnscan.errors import ModelError


class IgnoredNan(nn.Module):
    """conv → relu → conv (channel 7 is NaN) → relu → the head reads channels 0..6 only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(7, 5)
        with torch.no_grad():
            self.conv2.bias[7] = float("nan")

    def forward(self, x):
        x = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.fc(x[:, :7].mean(dim=(2, 3)))


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "method", ["gradcam", "scorecam", "ablationcam", "layercam", "eigencam", "lrp"]
)
def test_a_nan_the_logits_ignore_is_named_not_drawn(method):
    net = IgnoredNan()
    before = snapshot(net)
    with pytest.raises(ModelError, match=r"layer 'conv2' outputs NaN in channel\(s\) 7 of 8"):
        cnnscan.explain(net, X, method, targets=[0, 1])
    assert_unchanged(before, net)


def test_the_message_says_how_much_of_the_map_is_not_finite():
    with pytest.raises(ModelError, match=r"gradcam: its map is NaN/Inf \(100%\)"):
        cnnscan.explain(IgnoredNan(), X, "gradcam", targets=[0])


def test_methods_that_never_read_the_nan_still_explain():
    attr = cnnscan.explain(IgnoredNan(), X, "gradient", targets=[0])
    assert torch.isfinite(attr.maps).all()
