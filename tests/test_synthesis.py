"""Synthesis: objectives against hand computation, the image parameterization against
torch-lucent and closed forms, activation maximization / DeepDream / inversion on the
default model, reproducibility, the user's model left alone, and bad input."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import FORWARDS, SafetyNet, SmallConvNet, assert_unchanged, prepared, snapshot

import cnnscan
from cnnscan import synthesis
from cnnscan.engine.working_copy import runnable
from cnnscan.errors import LayerError, MethodError, TargetError
from cnnscan.synthesis import transforms as T
from cnnscan.synthesis.forward import probe
from cnnscan.synthesis.param import (
    COLOR_CORRELATION,
    FourierImage,
    ImageParam,
    PixelImage,
    fft_scale,
)
from cnnscan.synthesis.run import photo_pixels


def small_net() -> cnnscan.Model:
    return cnnscan.load_model(SmallConvNet(seed=3))


def layer_output(model: cnnscan.Model, pixels: torch.Tensor, layer: str) -> torch.Tensor:
    """The activations of `layer` through Scan (the explanation side, not synthesis code)."""
    x = model.preprocessing.normalize(pixels)
    scan = cnnscan.Scan(model, x, layers=[layer], relu_rules=False)
    return scan.activations(layer).detach()


# -- objectives ------------------------------------------------------------------------------
def test_objective_algebra_matches_hand_computation():
    net = SmallConvNet(seed=3).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    # The network by hand: conv1 -> relu -> maxpool -> conv2 -> ... -> fc.
    a1 = F.conv2d(x, net.conv1.weight, net.conv1.bias, padding=1)
    a2 = F.conv2d(F.max_pool2d(a1.relu(), 2), net.conv2.weight, net.conv2.bias, padding=1)
    a3 = F.conv2d(a2.relu(), net.conv3.weight, net.conv3.bias, padding=1)
    logits = F.linear(a3.relu().mean(dim=(2, 3)), net.fc.weight, net.fc.bias)

    c1 = synthesis.channel("conv1", 2)
    c2 = synthesis.channel("conv2", 5)
    n2 = synthesis.neuron("conv2", 1)
    cls = synthesis.class_logit(3)
    composed = {
        "a + b": (c1 + c2, a1[:, 2].mean() + a2[:, 5].mean()),
        "2a": (2 * c1, 2 * a1[:, 2].mean()),
        "a*2": (c1 * 2, 2 * a1[:, 2].mean()),
        "a - b": (c1 - c2, a1[:, 2].mean() - a2[:, 5].mean()),
        "-a": (-c1, -a1[:, 2].mean()),
        "a/4": (c1 / 4, a1[:, 2].mean() / 4),
        "a + 1": (c1 + 1, a1[:, 2].mean() + 1),
        "1 - a": (1 - c1, 1 - a1[:, 2].mean()),
        "sum": (sum([c1, c2, n2]), a1[:, 2].mean() + a2[:, 5].mean() + a2[:, 1, 2, 2].mean()),
        "neuron": (n2, a2[:, 1, 2, 2].mean()),  # centre of 4x4 = (2, 2)
        "class": (cls, logits[:, 3].mean()),
        "mixed": (
            0.5 * cls - 3 * (c1 - c2),
            0.5 * logits[:, 3].mean() - 3 * (a1[:, 2].mean() - a2[:, 5].mean()),
        ),
        "norm": (synthesis.layer_norm("conv2"), a2.square().mean()),
        "l2": (synthesis.l2(), x.square().mean()),
        "alpha": (synthesis.alpha_norm(3), x.abs().pow(3).mean()),
    }
    with runnable(net) as runner, torch.no_grad():
        for label, (objective, expected) in composed.items():
            found = probe(runner, objective, x, x, stop_early=False)
            objective.check(found)
            assert torch.allclose(objective(found), expected, atol=1e-5), label
    assert (c1 + c2).layers == (c1.layers[0], c2.layers[0])
    assert (c1 - 2 * cls).logits and not c1.logits
    assert (c1 - 2 * cls).name == "channel(conv1:2) - 2·class_logit(3)"


def test_total_variation_and_diversity_by_loops():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 5, 6, generator=gen)
    tv_terms = []
    for i in range(4):
        for j in range(5):
            dx = x[..., i, j + 1] - x[..., i, j]
            dy = x[..., i + 1, j] - x[..., i, j]
            tv_terms.append((dx**2 + dy**2) ** 1.5)  # beta = 3
    expected_tv = torch.stack(tv_terms).mean()
    acts = torch.randn(3, 4, 2, 3, generator=gen)
    grams = [a.reshape(4, -1) @ a.reshape(4, -1).T for a in acts]
    sims = [
        float((grams[i] / grams[i].norm() * grams[j] / grams[j].norm()).sum())
        for i in range(3)
        for j in range(3)
        if i != j
    ]
    net = torch.nn.Sequential(torch.nn.Identity())
    with runnable(net) as runner:
        found = probe(runner, synthesis.layer_norm("0"), acts, x, stop_early=False)
    tv = synthesis.total_variation(beta=3)(found)
    assert torch.allclose(tv, expected_tv, rtol=1e-3)
    diversity = synthesis.diversity("0")(found)
    assert math.isclose(float(diversity), -sum(sims) / 3, rel_tol=1e-5)


def test_objectives_agree_with_lucent():
    from lucent.optvis import objectives as lucent

    acts = torch.randn(3, 6, 5, 5, generator=torch.Generator().manual_seed(2))
    net = torch.nn.Sequential(torch.nn.Identity())
    with runnable(net) as runner:
        found = probe(runner, synthesis.layer_norm("0"), acts, acts, stop_early=False)

    def hook(_name: str) -> torch.Tensor:
        return acts

    # lucent minimizes, so its channel/neuron are the negatives of ours; diversity is equal.
    pairs = [
        (synthesis.channel("0", 4), -lucent.channel("x", 4)(hook)),
        (synthesis.neuron("0", 2), -lucent.neuron("x", 2)(hook)),
        (synthesis.diversity("0"), lucent.diversity("x")(hook)),
    ]
    for ours, theirs in pairs:
        assert torch.allclose(ours(found), theirs, atol=1e-6), ours.name


def test_forward_stops_after_the_objectives_layer():
    net = SmallConvNet(seed=3)
    x = torch.randn(1, 3, 8, 8)
    objective = synthesis.channel("conv2", 1)
    with runnable(net) as runner:
        calls = []
        handle = runner.conv3.register_forward_hook(lambda *_: calls.append(1))
        try:
            early = objective(probe(runner, objective, x, x))
            assert calls == []  # conv3 and everything after it did not run
            full = objective(probe(runner, objective, x, x, stop_early=False))
            assert calls == [1]
        finally:
            handle.remove()
    assert torch.equal(early, full)


# -- image parameterization ---------------------------------------------------------------------
@pytest.mark.parametrize("size", [(16, 16), (15, 21)])
def test_fourier_image_and_colours_equal_lucent(size):
    from lucent.optvis.param import color, spatial

    assert torch.allclose(COLOR_CORRELATION, torch.from_numpy(color.color_correlation_normalized))
    h, w = size
    with torch.random.fork_rng():
        torch.manual_seed(0)
        (spectrum,), lucent_image = spatial.fft_image((2, 3, h, w), sd=0.5)
    theirs = color.to_valid_rgb(lucent_image, decorrelate=True)()
    fourier = FourierImage((2, 3, h, w))
    with torch.no_grad():
        fourier.spectrum.copy_(spectrum[..., : w // 2 + 1, :])
    ours = ImageParam(fourier, decorrelate=True)()
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("kind", ["fft", "pixel"])
@pytest.mark.parametrize("decorrelate", [True, False])
def test_image_param_round_trips_pixels(kind, decorrelate):
    pixels = torch.rand(2, 3, 17, 20, generator=torch.Generator().manual_seed(4)) * 0.98 + 0.01
    spatial = (FourierImage if kind == "fft" else PixelImage)((2, 3, 17, 20))
    image = ImageParam(spatial, decorrelate)
    image.set_pixels(pixels)
    assert torch.allclose(image(), pixels, atol=2e-5)


def test_fourier_noise_has_a_one_over_f_squared_power_spectrum():
    gen = torch.Generator().manual_seed(0)
    values = FourierImage((256, 1, 64, 64), sd=1.0, generator=gen)().detach()
    power = torch.fft.rfft2(values * 4, norm="ortho").abs().square().mean(dim=(0, 1))
    freqs = 1 / fft_scale(64, 64)  # |f|, clamped at the lowest frequency
    # Hermitian bins (DC / Nyquist columns) lose their imaginary part: leave them out.
    keep = (freqs > 4 / 64) & (freqs < 0.45)
    keep[:, 0] = keep[:, -1] = False
    slope = np.polyfit(freqs[keep].log().numpy(), power[keep].log().numpy(), 1)[0]
    assert abs(slope - (-2.0)) < 0.05
    # Random spectrum entries are N(0, 1) in the real and imaginary parts: E|F|² = 2 / f².
    ratio = (power[keep] * freqs[keep] ** 2 / 2).mean()
    assert abs(float(ratio) - 1) < 0.05


# -- transforms ----------------------------------------------------------------------------
def test_transforms_closed_forms():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 10, 10, generator=gen)
    quarter = T.random_rotate([90])(x, gen)
    assert torch.allclose(quarter, torch.rot90(x, k=1, dims=(2, 3)), atol=1e-5)
    assert T.random_scale([2.0])(x, gen).shape[-2:] == (20, 20)
    padded = T.pad(3, value=0.25)(x, gen)
    assert padded.shape[-2:] == (16, 16) and torch.all(padded[..., :3, :] == 0.25)
    cropped = T.jitter(4)(x, gen)
    assert cropped.shape[-2:] == (6, 6)
    windows = [x[..., i : i + 6, j : j + 6] for i in range(5) for j in range(5)]
    assert any(torch.equal(cropped, w) for w in windows)
    a = T.resolve("standard")(x, torch.Generator().manual_seed(7))
    b = T.resolve("standard")(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(T.resolve("none")(x, gen), x)


# -- synthesis on the default model --------------------------------------------------------
@pytest.mark.slow
def test_activation_maximization_raises_the_channel_ten_fold(default_model):
    # Measured: 0.28 -> 4.4-4.6 (about 16x; ReLU6 caps the channel at 6).
    result = cnnscan.synthesize(
        default_model, "_blocks.10._swish@0:5", steps=128, size=128, progress=False
    )
    assert result.final >= 12 * result.initial > 0
    assert len(result.history) == 128 and np.mean(result.history[-16:]) > 10 * result.history[0]
    assert result.image.shape == (128, 128, 3) and result.image.dtype == np.uint8
    assert result.pixels.shape == (1, 3, 128, 128)
    # The objective's value is the channel's mean activation: check it independently.
    acts = layer_output(default_model, result.pixels, "_blocks.10._swish@0")
    assert math.isclose(float(acts[:, 5].mean()), result.final, rel_tol=1e-4)


def test_synthesis_is_reproducible_under_a_seed(default_model):
    def run(seed):
        return cnnscan.synthesize(
            default_model, "_blocks.4._swish@1:3", steps=6, size=48, seed=seed, progress=False
        )

    first, second, other = run(0), run(0), run(1)
    assert torch.equal(first.pixels, second.pixels)
    assert first.history == second.history
    assert not torch.equal(first.pixels, other.pixels)


def test_class_image_raises_the_class_logit(default_model):
    result = cnnscan.class_image(default_model, "Egyptian cat", steps=8, size=64)
    assert result.settings["class_id"] == 285 and result.settings["label"] == "Egyptian cat"
    logits = cnnscan.Scan(
        default_model, default_model.preprocessing.normalize(result.pixels), relu_rules=False
    ).logits
    # Measured at 64 px after 8 steps: logit 0.3 -> 49, among the top 5.
    assert logits[0, 285] > result.initial + 20 and 285 in logits[0].topk(5).indices
    # Simonyan et al.'s own setting: pixel parameters, no transforms, L2 + TV.
    pixel = cnnscan.class_image(
        default_model, 285, steps=8, size=64, param="pixel", transforms="none"
    )
    assert pixel.final > pixel.initial + 1
    assert "l2" in pixel.objective and "total_variation" in pixel.objective


def test_deepdream_amplifies_the_layer(default_model, chelsea):
    layer = "_blocks.4._swish@1"
    result = cnnscan.deepdream(
        default_model, chelsea, layer, octaves=2, steps=5, size=96, progress=False
    )
    assert result.pixels.shape == (1, 3, 96, 96) and len(result.history) == 10
    photo = photo_pixels(default_model, chelsea, (96, 96), torch.device("cpu"))
    before = layer_output(default_model, photo, layer).square().mean()
    after = layer_output(default_model, result.pixels, layer).square().mean()
    assert after > 1.2 * before  # measured: 1.37x
    assert math.isclose(result.final, float(after), rel_tol=1e-4)
    # Still the photo underneath: closer to it than to its mirror image.
    assert (result.pixels - photo).abs().mean() < (result.pixels - photo.flip(-1)).abs().mean()


@pytest.mark.slow
def test_inversion_lowers_the_feature_distance(default_model, chelsea):
    layer = "_blocks.2._swish@1"
    result = cnnscan.invert(
        default_model, chelsea, layer, steps=60, alpha_weight=0, tv_weight=0, progress=False
    )
    # Without penalties the objective is minus the normalized feature distance.
    windows = [np.mean(result.history[i : i + 10]) for i in range(0, 60, 10)]
    assert all(b > a for a, b in itertools.pairwise(windows)), windows
    photo = torch.from_numpy(np.asarray(default_model.view(chelsea), dtype=np.float32) / 255)
    target = layer_output(default_model, photo.permute(2, 0, 1).unsqueeze(0), layer)
    reconstruction = layer_output(default_model, result.pixels, layer)
    distance = (reconstruction - target).square().sum() / target.square().sum()
    assert math.isclose(-float(distance), result.final, rel_tol=1e-4)
    assert float(distance) < 0.25 * -result.initial
    with_penalties = cnnscan.invert(default_model, chelsea, layer, steps=10, progress=False)
    assert "alpha_norm(6)" in with_penalties.objective
    assert with_penalties.final > with_penalties.initial


# -- the user's model is left alone ---------------------------------------------------------
PHOTO = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(5))
RUNS = {
    "synthesize": lambda net: cnnscan.synthesize(
        net,
        synthesis.channel("conv3", 2) + 0.1 * synthesis.diversity("conv3"),
        steps=3,
        size=16,
        batch=2,
        progress=False,
    ),
    "class_image": lambda net: cnnscan.class_image(net, 1, steps=3, size=16),
    "deepdream": lambda net: cnnscan.deepdream(
        net, PHOTO, "conv2", octaves=1, steps=3, size=16, progress=False
    ),
    "invert": lambda net: cnnscan.invert(
        cnnscan.load_model(net, preprocessing=cnnscan.Preprocessing(size=(16, 16))),
        PHOTO,
        "conv2",
        steps=3,
        progress=False,
    ),
}


@pytest.mark.parametrize("kind", ["copyable", "uncopyable"])
@pytest.mark.parametrize("run", list(RUNS))
def test_model_unchanged(run, kind):
    net, seen = prepared(kind)
    before = snapshot(net)
    result = RUNS[run](net)
    assert np.isfinite(result.history).all()
    assert_unchanged(before, net)
    assert seen, "the user's hook should still fire"
    for fail_at in (1, 3):
        FORWARDS.update(count=0, fail_at=fail_at)
        try:
            with pytest.raises(RuntimeError, match="injected failure"):
                RUNS[run](net)
        finally:
            FORWARDS.update(count=0, fail_at=None)
        assert_unchanged(before, net)


@pytest.mark.parametrize("param", ["fft", "pixel"])
def test_init_starts_from_the_picture(param):
    picture = torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(6)) * 0.9 + 0.05
    result = cnnscan.synthesize(
        small_net(),
        "conv3:1",
        steps=1,
        size=(20, 24),
        lr=1e-7,
        param=param,
        init=picture,
        transforms="none",
        batch=2,
        device="cpu",
        progress=False,
    )
    assert torch.allclose(result.pixels, picture.expand(2, -1, -1, -1), atol=1e-4)


def test_progress_bar_is_silent_without_a_terminal(capsys):
    cnnscan.synthesize(SafetyNet(), "conv3:1", steps=2, size=16)
    assert capsys.readouterr().err == ""


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("objective", "options", "error", "message"),
    [
        ("nolayer:1", {}, LayerError, "no layer named 'nolayer'"),
        ("conv3:8", {}, TargetError, r"8 channels \(0..7\)"),
        ("acts.relu:1", {}, LayerError, "runs 3 times per forward; name one call"),
        ("acts.relu@5:1", {}, LayerError, "acts.relu@5 does not exist"),
        (synthesis.class_logit(5), {}, TargetError, r"5 classes \(0..4\)"),
        (synthesis.neuron("fc", 0), {}, TargetError, "spatial"),
        (synthesis.neuron("conv3", 0, x=9), {}, TargetError, r"x in 0..7"),
        (synthesis.diversity("conv3"), {}, MethodError, "batch >= 2"),
        ("conv3", {}, MethodError, "LAYER:CHANNEL"),
        ("conv3:1", {"steps": 0}, MethodError, "steps must be an integer >= 1"),
        ("conv3:1", {"lr": -1}, MethodError, "lr must be a number > 0"),
        ("conv3:1", {"param": "wavelet"}, MethodError, "fft"),
        ("conv3:1", {"transforms": "twist"}, MethodError, "standard"),
        ("conv3:1", {"size": 8}, MethodError, ">= 16"),
    ],
)
def test_bad_input(objective, options, error, message):
    options = {"steps": 2, "size": 16, **options}
    with pytest.raises(error, match=message):
        cnnscan.synthesize(small_net(), objective, progress=False, **options)


def test_bad_input_elsewhere(default_model):
    with pytest.raises(TypeError, match="numbers only"):
        synthesis.channel("conv1", 0) * synthesis.channel("conv1", 1)
    with pytest.raises(TargetError, match="whole number"):
        synthesis.channel("conv1", 1.5)
    with pytest.raises(TargetError, match="unknown class name 'tigr cat'"):
        cnnscan.class_image(default_model, "tigr cat", steps=1, size=32)
    with pytest.raises(MethodError, match="needs a layer"):
        cnnscan.deepdream(small_net(), torch.rand(3, 16, 16))
    with pytest.raises(MethodError, match="fewer octaves"):
        cnnscan.deepdream(default_model, "sample:coffee", "_blocks.3", octaves=9)
    with pytest.raises(LayerError, match="name one call"):
        cnnscan.invert(default_model, "sample:coffee", "_swish", steps=1)


# -- command line -------------------------------------------------------------------------------
def run_cli(*args: str) -> tuple[int, str, str]:
    from cnnscan.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_cli_dream(tmp_path):
    code, out, _ = run_cli(
        "dream",
        "--channel",
        "_blocks.2._swish@1:3",
        "--steps",
        "3",
        "--size",
        "32",
        "--batch",
        "2",
        "--diversity",
        "0.5",
        "--out",
        str(tmp_path),
    )
    assert code == 0 and "channel(_blocks.2._swish@1:3) + 0.5·diversity" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "channel-_blocks.2._swish@1-3-0.png",
        "channel-_blocks.2._swish@1-3-1.png",
        "channel-_blocks.2._swish@1-3.json",
    ]
    summary = json.loads((tmp_path / "channel-_blocks.2._swish@1-3.json").read_text())
    assert len(summary["history"]) == 3 and summary["settings"]["batch"] == 2
    code, out, _ = run_cli(
        "dream",
        "--deepdream",
        "sample:chelsea",
        "--layer",
        "_blocks.2",
        "--octaves",
        "2",
        "--steps",
        "2",
        "--size",
        "64",
        "--out",
        str(tmp_path),
    )
    assert code == 0 and (tmp_path / "deepdream-_blocks.2.png").is_file()
    code, _, err = run_cli("dream", "--invert", "sample:chelsea")
    assert code == 1 and "--invert needs --layer" in err
    code, _, err = run_cli("dream", "--neuron", "_blocks.2._swish@1:9999", "--steps", "1")
    assert code == 1 and "out of range" in err and "(0..143)" in err
