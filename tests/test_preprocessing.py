"""Preprocessing: the bundled model sees a photo through its own reference pipeline
(TensorFlow EfficientNet-Lite: a centre crop of 224/256 of the shorter side, bicubic to
224×224, (x − 127)/128), checked against an independent numpy re-implementation; every
pipeline describes itself; presets and text for files that do not record theirs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import DOMESTIC_CATS
from PIL import Image
from torch import nn

import cnnscan
from cnnscan import ModelError, Preprocessing
from cnnscan.models.preprocessing import parse_preprocessing, preset


# -- an independent re-implementation (tensorflow/tpu models/official/efficientnet) ---------------
def tf_crop_window(height: int, width: int) -> tuple[int, int, int]:
    """(top, left, side) as `_decode_and_center_crop` computes them: the float32 product
    224/(224+32) × shorter side truncated (at least 1 px), offsets ((side − crop) + 1) // 2."""
    side = int(np.float32(224 / (224 + 32)) * np.float32(min(height, width)))
    side = max(side, 1)
    return (height - side + 1) // 2, (width - side + 1) // 2, side


def keys_cubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of Pillow's bicubic (Keys, a = −0.5, half-pixel centres, the
    kernel stretched by the scale when shrinking), written from its definition."""

    def keys(x: np.ndarray) -> np.ndarray:
        x = np.abs(x)
        near = ((1.5 * x - 2.5) * x) * x + 1
        far = ((-0.5 * x + 2.5) * x - 4) * x + 2
        return np.where(x < 1, near, np.where(x < 2, far, 0.0))

    scale = in_size / out_size
    stretch = max(scale, 1.0)
    weights = np.zeros((out_size, in_size))
    for o in range(out_size):
        centre = (o + 0.5) * scale
        lo = max(int(centre - 2 * stretch + 0.5), 0)
        hi = min(int(centre + 2 * stretch + 0.5), in_size)
        taps = keys((np.arange(lo, hi) - centre + 0.5) / stretch)
        weights[o, lo:hi] = taps / taps.sum()
    return weights


def numpy_bicubic(pixels: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize to size×size, horizontal pass first, each pass rounded to 0..255."""
    height, width = pixels.shape[:2]
    rows = np.einsum("pw,hwc->hpc", keys_cubic_weights(width, size), pixels.astype(float))
    if width != size:
        rows = np.clip(np.floor(rows + 0.5), 0, 255)
    out = np.einsum("oh,hpc->opc", keys_cubic_weights(height, size), rows)
    return np.clip(np.floor(out + 0.5), 0, 255)


def reference_input(pixels: np.ndarray, resize) -> np.ndarray:
    """(1, 3, 224, 224): the TF crop, `resize` of the crop to 224×224, (x − 127)/128."""
    top, left, side = tf_crop_window(*pixels.shape[:2])
    resized = resize(pixels[top : top + side, left : left + side]).astype(np.float32)
    return ((resized - 127) / 128).transpose(2, 0, 1)[None]


def pil_bicubic(crop: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(crop).resize((224, 224), Image.Resampling.BICUBIC))


def _photos() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    astronaut = Image.fromarray(np.asarray(cnnscan.load_image("sample:astronaut")))
    chelsea = np.asarray(cnnscan.load_image("sample:chelsea"))
    return {
        "wide 300x451": chelsea,
        "tall 451x300": chelsea.transpose(1, 0, 2).copy(),
        "square 224": np.asarray(astronaut.resize((224, 224))),
        "square 256": np.asarray(astronaut.resize((256, 256))),
        "tiny 50x30": rng.integers(0, 256, (50, 30, 3), dtype=np.uint8),
        "odd 333x517": np.asarray(astronaut.resize((517, 333))),
        "one pixel wide 40x1": rng.integers(0, 256, (40, 1, 3), dtype=np.uint8),
    }


PHOTOS = _photos()


# -- the bundled model's pipeline ----------------------------------------------------------------
def test_crop_window_is_tensorflows_arithmetic():
    prep = cnnscan.load_model(weights=None).preprocessing
    for height in (1, 2, 7, 30, 50, 224, 256, 300, 333, 451, 517, 640, 4000):
        for width in (1, 5, 30, 99, 224, 300, 427, 517):
            top, left, side = tf_crop_window(height, width)
            assert prep.crop_box(width, height) == (left, top, left + side, top + side)
            assert side == max(7 * min(height, width) // 8, 1)  # 224/256 = 7/8, exact here


@pytest.mark.parametrize("name", list(PHOTOS))
def test_default_input_equals_an_independent_reimplementation(default_model, name):
    pixels = PHOTOS[name]
    ours = default_model.preprocess(pixels).cpu().numpy()
    assert ours.shape == (1, 3, 224, 224)
    # the crop and the normalization written out, the resize by Pillow on our own crop
    np.testing.assert_allclose(ours, reference_input(pixels, pil_bicubic), rtol=0, atol=1e-6)
    # and the resize from its definition: at most one grey level apart (Pillow's
    # fixed-point arithmetic rounds a few pixels the other way)
    independent = reference_input(pixels, lambda crop: numpy_bicubic(crop, 224))
    assert np.abs(ours - independent).max() <= 1 / 128 + 1e-6
    # the picture shown in reports is exactly the one the model sees
    seen = np.asarray(default_model.view(pixels), dtype=np.float32)
    np.testing.assert_allclose((seen - 127) / 128, ours[0].transpose(1, 2, 0), atol=1e-6)


def _top(model: cnnscan.Model, image) -> tuple[int, str, float]:
    (best,) = cnnscan.predict(model, image, k=1)[0]
    return best["class_id"], best["label"], best["probability"]


@pytest.mark.parametrize(
    ("photo", "class_id", "label", "probability"),
    [
        ("coffee", 967, "espresso", 0.951),
        ("rocket", 657, "missile", 0.242),
        ("flower.jpg", 985, "daisy", 0.321),
    ],
)
def test_default_model_reproduces_the_reference_pipelines_predictions(
    default_model, photo, class_id, label, probability
):
    # Numbers of the TF reference pipeline (crop, Pillow bicubic, 127/128); with the old
    # squash and ImageNet statistics the flower was "honeycomb" at 0.05.
    if photo.endswith(".jpg"):
        datasets = pytest.importorskip("sklearn.datasets")
        image = datasets.load_sample_image(photo)
    else:
        image = f"sample:{photo}"
    expected = (class_id, label, pytest.approx(probability, abs=0.002))
    assert _top(default_model, image) == expected


def test_the_cat_is_a_domestic_cat(default_model, chelsea):
    class_id, _, _ = _top(default_model, chelsea)
    assert class_id in DOMESTIC_CATS


# -- describing a pipeline ------------------------------------------------------------------------
def test_every_pipeline_describes_itself_in_one_line(default_model):
    assert default_model.preprocessing.describe() == (
        "centre crop 87.5 % of the shorter side, bicubic to 224×224, (x − 127)/128"
    )
    assert "EfficientNet-Lite" in default_model.preprocessing.describe(origin=True)
    assert Preprocessing().describe() == (
        "shorter side bilinear to 256, centre crop 224×224, ImageNet mean/std"
    )
    squash = Preprocessing((288, 288), None, "bicubic", resize_to=(320, 320))
    assert squash.describe() == (
        "bicubic to 320×320 (aspect not kept), centre crop 288×288, ImageNet mean/std"
    )
    straight = Preprocessing((32, 48), None, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    assert straight.describe() == (
        "bilinear to 32×48 (aspect not kept), mean (0.5, 0.4, 0.3), std (0.2, 0.2, 0.2) on 0..1"
    )
    assert preset("inception", (299, 299)).describe() == (
        "shorter side bicubic to 341, centre crop 299×299, (x − 127.5)/127.5"
    )


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="crop_fraction must be in"):
        Preprocessing(resize_shorter=None, crop_fraction=1.5)
    with pytest.raises(ValueError, match="resize_shorter=None"):
        Preprocessing(crop_fraction=0.875)  # resize_shorter=256 would resize after the crop


# -- presets and text, for models that do not record their pipeline -------------------------------
def test_presets_and_keys():
    inception = parse_preprocessing("inception", (299, 299))
    assert (inception.size, inception.resize_shorter, inception.interpolation) == (
        (299, 299),
        341,
        "bicubic",
    )
    pixels = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(inception.normalize(pixels).flatten(), torch.tensor([-1.0, 0, 1]))
    assert parse_preprocessing("efficientnet-lite") == preset("efficientnet-lite")
    explicit = parse_preprocessing("size=320x256,resize=squash,mean=0.4,0.5,0.6,std=0.25")
    assert explicit == Preprocessing((320, 256), None, mean=(0.4, 0.5, 0.6), std=(0.25, 0.25, 0.25))
    cropped = parse_preprocessing("imagenet,crop=0.9,interpolation=bicubic")
    assert (cropped.crop_fraction, cropped.resize_shorter, cropped.mean) == (
        0.9,
        None,
        preset("imagenet").mean,
    )
    assert parse_preprocessing("imagenet,size=299").resize_shorter == 341


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("caffe", "BGR"),
        ("resnet", "presets: imagenet, inception, efficientnet-lite"),
        ("size=big", "size is N or HxW"),
        ("crop=0.5,resize=256", "exclude each other"),
        ("mean=127", "0..1 scale"),
        ("mean=0.1,0.2", "one value or three"),
        ("gamma=2", "unknown key 'gamma'"),
        ("imagenet,bicubic", "expected KEY=VALUE"),
        ("crop=2", "crop_fraction must be in"),
    ],
)
def test_bad_text_gets_a_model_error(spec, match):
    with pytest.raises(ModelError, match=match):
        parse_preprocessing(spec)


def test_load_model_takes_a_pipeline_and_says_whether_it_was_assumed():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    assumed = cnnscan.load_model(net).preprocessing
    assert assumed == Preprocessing() and assumed.origin.startswith("assumed: a module")
    given = cnnscan.load_model(net, preprocessing="inception,size=96").preprocessing
    assert given == preset("inception", (96, 96)) and given.origin == "given: inception,size=96"
    mine = Preprocessing(size=(64, 64), resize_shorter=None)
    assert cnnscan.load_model(net, preprocessing=mine).preprocessing.origin == "given"
    with pytest.raises(ModelError, match="unknown preprocessing"):
        cnnscan.load_model(net, preprocessing="tensorflow")
