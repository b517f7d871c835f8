"""What the network learned: filters are exactly the conv weights, feature maps equal a
manual forward (one forward for many layers), the grids draw exactly those values, the CLI
commands and the report section, clear errors and an unchanged model."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import Linear, SmallConvNet, assert_unchanged, prepared, snapshot
from PIL import Image
from torch import nn

import cnnscan
from cnnscan import LayerError, render
from cnnscan.cli import main
from cnnscan.learned import depth_layers
from cnnscan.report import CLASS_IMAGE_PX, CLASS_IMAGE_STEPS, LEARNED_TILE_PX


# -- filters ---------------------------------------------------------------------------------------
def test_filters_are_exactly_the_weights_and_a_copy(default_model):
    module = default_model.module
    first = cnnscan.filters(default_model)
    assert torch.equal(first, module._conv_stem.weight)
    assert first.data_ptr() != module._conv_stem.weight.data_ptr()
    deep = cnnscan.filters(default_model, "_blocks.3._depthwise_conv")
    assert torch.equal(deep, module._blocks[3]._depthwise_conv.weight)
    resnet = torchvision.models.resnet18(weights=None)
    assert torch.equal(cnnscan.filters(resnet, "layer1.0.conv1"), resnet.layer1[0].conv1.weight)
    assert torch.equal(cnnscan.filters(resnet), resnet.conv1.weight)


def test_filters_of_a_reused_module_call():
    net = SmallConvNet()
    assert torch.equal(cnnscan.filters(net, "conv2@0"), net.conv2.weight)


@pytest.mark.parametrize(
    ("layer", "needle"),
    [
        ("_bn0", r"'_bn0' is a BatchNorm2d, not a convolution.*_conv_stem, _blocks\.0\."),
        ("_swish", "ReLU6, not a convolution"),
        ("_conv_stm", "no layer named '_conv_stm'. Did you mean: _conv_stem"),
    ],
)
def test_filters_of_other_layers_are_clear_errors(default_model, layer, needle):
    with pytest.raises(LayerError, match=needle):
        cnnscan.filters(default_model, layer)


def test_a_model_without_convolutions():
    with pytest.raises(LayerError, match=r"no nn\.Conv2d"):
        cnnscan.filters(Linear())


# -- filter grids ----------------------------------------------------------------------------------
def tile(picture: np.ndarray, index: int, size: int, columns: int, pad: int = 2) -> np.ndarray:
    row, col = divmod(index, columns)
    top, left = row * (size + pad) + pad, col * (size + pad) + pad
    return picture[top : top + size, left : left + size]


def test_rgb_tiles_are_each_filter_min_max_scaled():
    weights = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    picture = render.filter_grid(weights, "rgb", tile_px=4, labels=False)
    assert picture.shape == (2 * 6 + 2, 3 * 6 + 2, 3)  # 3 columns (≈√5), 2 rows, 2-px gaps
    for i in range(5):
        w = weights[i]
        expected = ((w - w.min()) / (w.max() - w.min()) * 255).round().byte()
        np.testing.assert_array_equal(tile(picture, i, 4, 3), expected.permute(1, 2, 0).numpy())


def test_mean_and_channel_tiles():
    weights = torch.randn(3, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    mean = render.filter_grid(weights, "mean", tile_px=3, labels=False)
    for i in range(3):
        m = weights[i].mean(dim=0)
        expected = ((m - m.min()) / (m.max() - m.min()) * 255).round().byte().numpy()
        np.testing.assert_array_equal(tile(mean, i, 3, 2)[..., 0], expected)
    channels = render.filter_grid(weights, "channels", tile_px=3, max_channels=2, labels=False)
    assert channels.shape[1] == 2 * 5 + 2  # one row per filter, 2 of its 4 channels
    w = weights[2]
    scaled = (w - w.min()) / (w.max() - w.min())  # min-max over the whole filter
    for c in range(2):
        expected = (scaled[c] * 255).round().byte().numpy()
        np.testing.assert_array_equal(tile(channels, 2 * 2 + c, 3, 2)[..., 0], expected)


def test_filter_grid_limits_and_modes():
    weights = torch.randn(100, 3, 3, 3)
    assert render.filter_grid(weights, max_filters=9, tile_px=3, labels=False).shape == (17, 17, 3)
    with pytest.raises(ValueError, match="needs filters with 3 input channels; these have 8"):
        render.filter_grid(torch.randn(4, 8, 3, 3), "rgb")
    with pytest.raises(ValueError, match="unknown filter mode"):
        render.filter_grid(weights, "colour")
    depthwise = render.filter_grid(torch.randn(16, 1, 3, 3), tile_px=3, labels=False)
    assert depthwise.shape == (4 * 5 + 2, 4 * 5 + 2, 3)  # laid out as a square, not a strip


# -- feature maps ----------------------------------------------------------------------------------
def manual_default_forward(module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        stem_conv = module._conv_stem(x)
        stem = module._swish(module._bn0(stem_conv))
        h = stem
        blocks = {}
        for i, block in enumerate(module._blocks):
            h = block(h, drop_connect_rate=0.0)
            blocks[i] = h
        head = module._swish(module._bn1(module._conv_head(h)))
    return {"_conv_stem": stem_conv, "_swish@0": stem, "_blocks.2": blocks[2], "_swish@1": head}


def test_feature_maps_equal_a_manual_forward(default_model, chelsea):
    maps = cnnscan.feature_maps(
        default_model, chelsea, ["_conv_stem", "_swish@0", "_blocks.2", "_swish@1"]
    )
    expected = manual_default_forward(
        default_model.module.eval(), default_model.preprocess(chelsea)
    )
    assert list(maps) == list(expected)
    for layer, tensor in expected.items():
        assert maps[layer].shape == tensor.shape
        torch.testing.assert_close(maps[layer], tensor, rtol=1e-4, atol=1e-4)
    assert maps["_swish@1"].shape == (1, 1280, 7, 7)


class Counting(SmallConvNet):
    forwards = 0

    def forward(self, x):
        Counting.forwards += 1
        return super().forward(x)


def test_one_forward_for_many_layers_and_calls():
    net = Counting()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    Counting.forwards = 0
    maps = cnnscan.feature_maps(net, x, ["conv1", "acts.relu@0", "acts.relu@2", "pool"])
    assert Counting.forwards == 1
    first = F.relu(net.conv1(x))
    torch.testing.assert_close(maps["acts.relu@0"], first)
    torch.testing.assert_close(maps["pool"], F.max_pool2d(first, 2))
    third = F.relu(net.conv3(F.relu(net.conv2(F.max_pool2d(first, 2)))))
    torch.testing.assert_close(maps["acts.relu@2"], third)
    assert not maps["conv1"].requires_grad


def test_feature_map_errors(default_model, chelsea):
    with pytest.raises(LayerError, match=r"runs 2 times.*_swish@0.*_swish@1"):
        cnnscan.feature_maps(default_model, chelsea, ["_swish"])
    with pytest.raises(LayerError, match=r"no layer named '_blocks\.99'"):
        cnnscan.feature_maps(default_model, chelsea, ["_blocks.2", "_blocks.99"])
    with pytest.raises(LayerError, match="at least one layer"):
        cnnscan.feature_maps(default_model, chelsea, [])


def test_unknown_layers_fail_before_any_forward():
    net = Counting()
    Counting.forwards = 0
    with pytest.raises(LayerError):
        cnnscan.feature_maps(net, torch.zeros(1, 3, 16, 16), "conv9")
    assert Counting.forwards == 0


def test_top_channels_and_feature_grid_scales():
    maps = torch.zeros(3, 2, 2)
    maps[0] = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # mean 0.5
    maps[1] = torch.tensor([[0.0, 10.0], [0.0, 10.0]])  # mean 5
    maps[2] = 2.0  # mean 2, constant
    assert cnnscan.top_channels(maps).tolist() == [1, 2, 0]
    assert cnnscan.top_channels(maps, 2).tolist() == [1, 2]
    shared = render.feature_grid(maps, [0, 1], cmap="gray", tile_px=2, labels=False)
    per_map = render.feature_grid(
        maps, [0, 1], scale="per-map", cmap="gray", tile_px=2, labels=False
    )
    # shared: one range 0..10 for both maps; per-map: each map its own 0..max
    assert tile(shared, 0, 2, 2)[0, 1, 0] == round(255 * 1 / 10)
    assert tile(shared, 1, 2, 2)[0, 1, 0] == 255
    assert tile(per_map, 0, 2, 2)[0, 1, 0] == 255 and tile(per_map, 0, 2, 2)[0, 0, 0] == 0
    with pytest.raises(ValueError, match="channel 3 is out of range"):
        render.feature_grid(maps, [3])
    with pytest.raises(ValueError, match="unknown scale"):
        render.feature_grid(maps, scale="log")


def test_grid_labels_are_drawn():
    maps = torch.rand(4, 8, 8)
    plain = render.feature_grid(maps, tile_px=8, labels=False)
    labelled = render.feature_grid(maps, tile_px=8)
    assert labelled.shape[0] == plain.shape[0] + 2 * 12  # a 12-px strip above each row
    strip = labelled[2:14, 2:10]
    assert (strip < 128).any() and (labelled[14:22, 2:10] == plain[2:10, 2:10]).all()


def test_depth_layers_of_the_default_model(default_model, chelsea):
    scan = cnnscan.Scan(default_model, default_model.preprocess(chelsea), relu_rules=False)
    layers = depth_layers(scan.layer_table())
    assert len(layers) == 3 and layers[-1] == "_swish@1"
    names = [row.name for row in scan.layer_table()]
    assert names.index(layers[0]) < names.index(layers[1]) < names.index(layers[2])


# -- the user's model is left alone ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["copyable", "uncopyable"])
def test_model_unchanged(kind):
    net, seen = prepared(kind)
    before = snapshot(net)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    weights = cnnscan.filters(net, "conv2")
    weights.add_(1.0)  # the copy is the caller's to change
    maps = cnnscan.feature_maps(net, x, ["relu@0", "relu@3", "bn2", "pool"])
    render.feature_grid(maps["relu@3"][0])
    render.filter_grid(cnnscan.filters(net))
    fields = cnnscan.receptive_fields(net, x)
    assert fields["conv4"].size == (14, 14)  # 3, 5, pool 6, +2·2 (conv3), +2·2 (conv4)
    with pytest.raises(LayerError):
        cnnscan.feature_maps(net, x, ["relu"])
    with pytest.raises(LayerError):
        cnnscan.filters(net, "bn1")
    assert_unchanged(before, net)
    assert seen, "the user's hook should still fire"


# -- command line ----------------------------------------------------------------------------------
def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_filters(capsys, tmp_path, default_model):
    code, out, err = run(capsys, "filters", "--out", str(tmp_path))
    assert code == 0, err
    assert out.startswith("_conv_stem: 32 filters of 3×3×3")
    saved = np.load(tmp_path / "filters__conv_stem.npy")
    np.testing.assert_array_equal(saved, default_model.module._conv_stem.weight.detach().numpy())
    picture = np.asarray(Image.open(tmp_path / "filters__conv_stem.png"))
    np.testing.assert_array_equal(picture, render.filter_grid(torch.from_numpy(saved)))
    code, out, err = run(
        capsys, "filters", "--layer", "_blocks.1._expand_conv", "--mode", "mean",
        "--max-filters", "8", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    assert "96 filters of 16×1×1 (in×h×w), 8 drawn" in out
    assert (tmp_path / "filters__blocks.1._expand_conv.png").is_file()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--layer", "_bn0"], "not a convolution"),
        (["--layer", "_blocks.1._expand_conv", "--mode", "rgb"], "3 input channels"),
        (["--layer", "nope"], "no layer named"),
    ],
)
def test_cli_filters_errors_are_one_line(capsys, tmp_path, argv, needle):
    code, _, err = run(capsys, "filters", *argv, "--out", str(tmp_path))
    assert code == 1
    (line,) = err.strip().splitlines()
    assert line.startswith("cnnscan: error") and needle in line


def test_cli_features(capsys, tmp_path, default_model, chelsea):
    code, out, err = run(
        capsys, "features", "sample:chelsea", "--layer", "_swish@1", "--layer", "_blocks.2",
        "--top", "8", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    expected = cnnscan.feature_maps(default_model, chelsea, ["_swish@1", "_blocks.2"])
    head = np.load(tmp_path / "features__swish_call1.npy")
    np.testing.assert_array_equal(head, expected["_swish@1"][0].numpy())
    top = cnnscan.top_channels(expected["_swish@1"][0], 8)
    line = next(line for line in out.splitlines() if line.startswith("_swish@1"))
    assert "1280×7×7" in line
    assert [int(c) for c in re.findall(r"(\d+) \(", line)] == top[:5].tolist()
    picture = np.asarray(Image.open(tmp_path / "features__swish_call1.png"))
    np.testing.assert_array_equal(picture, render.feature_grid(expected["_swish@1"][0], top))
    assert (tmp_path / "features__blocks.2.png").is_file()


def test_cli_features_errors(capsys, tmp_path):
    code, _, err = run(
        capsys, "features", "sample:chelsea", "--layer", "_fc", "--out", str(tmp_path)
    )
    assert code == 1 and "not feature maps" in err
    code, _, err = run(
        capsys, "features", "sample:chelsea", "--layer", "_swish", "--out", str(tmp_path)
    )
    assert code == 1 and "_swish@1" in err and len(err.strip().splitlines()) == 1


def test_cli_layers_shows_receptive_fields(capsys):
    code, out, err = run(capsys, "layers")
    assert code == 0, err
    header = out.splitlines()[0].split()
    assert header[-3:] == ["RF", "jump", "parameters"]
    head = next(line.split() for line in out.splitlines() if line.startswith("_swish@1"))
    assert head[-3:-1] == ["851", "32"]
    stem = next(line.split() for line in out.splitlines() if line.startswith("_conv_stem "))
    assert stem[-3:-1] == ["3", "2"]


@pytest.mark.parametrize("command", ["filters", "features"])
def test_help_shows_examples(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"cnnscan {command}" in capsys.readouterr().out.split("examples:")[1]


# -- the report ------------------------------------------------------------------------------------
def decode(src: str) -> np.ndarray:
    data = base64.b64decode(src.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_report_section(quick_report, default_model, chelsea):
    code, out, _, stderr = quick_report
    assert code == 0, stderr
    html = (out / "report.html").read_text(encoding="utf-8")
    section = html.split('<h2 id="learned">', 1)[1].split("<h2", 1)[0]
    figures = re.findall(r'<img src="(data:image/png;base64,[^"]+)" alt="([^"]+)"', section)
    alts = [alt for _, alt in figures]
    assert alts[0] == "filters of _conv_stem"
    assert len(alts) == 4 and all(alt.startswith("feature maps of ") for alt in alts[1:])
    assert alts[-1] == "feature maps of _swish@1"
    filters_picture = render.filter_grid(cnnscan.filters(default_model), tile_px=24)
    np.testing.assert_array_equal(decode(figures[0][0]), filters_picture)
    assert (out / "learned" / "filters__conv_stem.png").is_file()
    layer = alts[-1].removeprefix("feature maps of ")
    maps = cnnscan.feature_maps(default_model, chelsea, layer)[layer][0]
    expected = render.feature_grid(maps, cnnscan.top_channels(maps, 16), tile_px=LEARNED_TILE_PX)
    shown = decode(figures[-1][0])
    assert shown.shape == expected.shape
    assert (np.abs(shown.astype(int) - expected).max(axis=-1) > 8).mean() < 0.01
    timings = (out / "timings.json").read_text()
    assert "what the network learned" in timings and "receptive fields" in timings
    assert "class image" in timings


def test_report_class_image_is_large_with_its_steps_and_probability(quick_report, default_model):
    """The synthesized top-1 class image sits beside the predictions, shown at least 224 px
    wide, with its steps and the probability the model gives it (an independent forward)."""
    _, out, _, _ = quick_report
    html = (out / "report.html").read_text(encoding="utf-8")
    top1 = json.loads((out / "predictions.json").read_text())[0]
    found = re.search(
        r'<img src="(data:image/png;base64,[^"]+)" alt="synthesized image of the top-1 class" '
        r'width="(\d+)" height="(\d+)">\s*<figcaption[^>]*>([^<]+)</figcaption>',
        html,
    )
    assert found, "no class image"
    source, width, height, caption = found.groups()
    assert int(width) >= 224 and int(height) >= 224 and int(width) % CLASS_IMAGE_PX == 0
    synthesized = cnnscan.class_image(
        default_model, top1["class_id"], steps=CLASS_IMAGE_STEPS, size=CLASS_IMAGE_PX
    )
    # 48 optimizer steps amplify float rounding (torch's thread split of a kernel changes it):
    # a run in another process state moves a few pixels, so compare the picture as a whole
    difference = np.abs(decode(source).astype(float) - synthesized.image.astype(float))
    assert difference.mean() < 1.0 and np.mean(difference > 2) < 0.01, difference.max()
    assert (out / "learned" / "class_image.png").is_file()
    pixels = default_model.preprocessing.normalize(synthesized.pixels[:1])
    with torch.no_grad():
        probability = float(default_model.module(pixels).softmax(1)[0, top1["class_id"]])
    assert f"maximize {top1['class_id']} {top1['label']}" in caption
    assert f"{CLASS_IMAGE_STEPS} steps at {CLASS_IMAGE_PX}×{CLASS_IMAGE_PX} px" in caption
    assert f"p = {probability:.3f}" in caption


def test_report_layer_table_has_receptive_fields(quick_report):
    _, out, _, _ = quick_report
    html = (out / "report.html").read_text(encoding="utf-8")
    table = html.split("module calls (name, type, output shape, receptive field", 1)[1]
    row = re.search(r">_swish@1</td>.*?</tr>", table, re.S).group(0)
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", row)
    assert cells[-3:-1] == ["851", "32"]
