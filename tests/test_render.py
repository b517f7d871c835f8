"""Drawing maps: the robust scale against captum's visualization and a numpy computation,
the views built on it, the colour maps (a diverging one puts 0 at its centre colour), the
colour bars and the overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr._utils.visualization import _cumulative_sum_threshold, _normalize_attr

from cnnscan import render


def heavy_tailed(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A map like a gradient: mostly small values, a few large ones, both signs, and one
    outlier 10 times the next largest (that a min-max scale would be all about; well
    under 2 % of the total, or captum's threshold would be the outlier itself)."""
    rng = np.random.default_rng(seed)
    values = rng.standard_t(df=3, size=shape)
    values[(0,) * len(shape)] = 10 * np.abs(values).max()
    return values


def numpy_clip_value(values: np.ndarray, outlier_perc: float) -> float:
    """The smallest |value| whose sorted cumulative sum reaches (100 − perc) % of the total."""
    magnitude = np.sort(np.abs(values).ravel())
    share = np.cumsum(magnitude) / magnitude.sum()
    return float(magnitude[np.argmax(share >= (100 - outlier_perc) / 100)])


@pytest.mark.parametrize("outlier_perc", [0.5, 2, 10])
@pytest.mark.parametrize("seed", [0, 1])
def test_clip_value_is_captums_threshold(outlier_perc, seed):
    values = heavy_tailed((3, 31, 29), seed)
    expected = _cumulative_sum_threshold(np.abs(values), 100 - outlier_perc)
    assert render.clip_value(values, outlier_perc) == pytest.approx(expected, rel=1e-6)
    assert render.clip_value(values, outlier_perc) == pytest.approx(
        numpy_clip_value(values, outlier_perc), rel=1e-6
    )
    assert render.clip_value(values, 0) == pytest.approx(np.abs(values).max(), rel=1e-6)


def test_clip_value_of_a_zero_map_is_zero():
    assert render.clip_value(np.zeros((3, 4, 4))) == 0.0
    assert render.view(torch.zeros(3, 4, 4), "signed").abs().max() == 0


def test_signed_view_is_captums_normalization():
    """captum's `visualize_image_attr(..., sign="all", outlier_perc=p)` sums the channels
    and clips at the outlier threshold: the same values, in [-1, 1]."""
    values = heavy_tailed((3, 48, 40)).astype(np.float32)
    expected = _normalize_attr(values.sum(axis=0), "all", outlier_perc=render.OUTLIER_PERC)
    shown = render.view(torch.from_numpy(values), "signed").numpy()
    np.testing.assert_allclose(shown, expected, rtol=1e-5, atol=1e-6)
    low, high = render.view_scale(torch.from_numpy(values), "signed")
    top = numpy_clip_value(values.sum(axis=0), render.OUTLIER_PERC)
    assert -low == high == pytest.approx(top, rel=1e-6)


def test_magnitude_and_rgb_views_clip_at_their_own_threshold():
    values = torch.from_numpy(heavy_tailed((3, 96, 96), seed=3).astype(np.float32))
    magnitude = values.abs().sum(dim=0).numpy()
    top = numpy_clip_value(magnitude, render.OUTLIER_PERC)
    np.testing.assert_allclose(
        render.view(values, "grayscale").numpy(), np.clip(magnitude / top, 0, 1), rtol=1e-5
    )
    assert render.view_scale(values, "heatmap") == (0.0, pytest.approx(top, rel=1e-6))
    part = np.maximum(values.numpy(), 0)
    positive = numpy_clip_value(part, render.OUTLIER_PERC)
    np.testing.assert_allclose(
        render.view(values, "positive").numpy(), np.clip(part / positive, 0, 1), rtol=1e-5
    )
    colour = render.view(values, "colour").numpy()
    both = numpy_clip_value(values.numpy(), render.OUTLIER_PERC)
    np.testing.assert_allclose(colour, 0.5 + 0.5 * np.clip(values.numpy() / both, -1, 1), rtol=1e-5)
    # The outlier no longer decides the scale: it is clipped, the rest keeps its contrast.
    assert top < magnitude.max() / 5
    assert magnitude[magnitude > top].sum() <= render.OUTLIER_PERC / 100 * magnitude.sum() + top
    minmax_median = np.median(magnitude / magnitude.max())
    assert np.median(render.view(values, "grayscale").numpy()) > 5 * minmax_median


def test_layer_heatmap_is_min_max_scaled():
    cam = torch.randn(1, 9, 11, generator=torch.Generator().manual_seed(0))
    low, high = render.view_scale(cam, "heatmap")
    assert (low, high) == (float(cam.min()), float(cam.max()))
    torch.testing.assert_close(render.view(cam, "heatmap"), (cam[0] - low) / (high - low))
    with pytest.raises(ValueError, match="unknown view"):
        render.view_scale(cam, "sepia")


@pytest.mark.parametrize(
    ("cmap", "centre"), [("rdbu", (247, 247, 247)), ("coolwarm", (221, 221, 221))]
)
def test_a_diverging_colour_map_puts_zero_at_its_centre_colour(cmap, centre):
    signed = np.array([[-1.0, 0.0, 1.0]])
    rgb = render.to_rgb(signed, cmap)
    assert tuple(rgb[0, 1]) == centre
    assert tuple(rgb[0, 0]) != centre != tuple(rgb[0, 2])
    bar = render.colorbar(51, cmap, signed=True)
    assert tuple(bar[0, 25]) == centre  # the middle of a signed colour bar is zero
    assert render.DIVERGING == "rdbu"
    blue, red = rgb[0, 0], rgb[0, 2]
    assert blue[2] > blue[0] and red[0] > red[2]  # negative blue, positive red


def test_colorbar_runs_from_the_low_to_the_high_end_of_the_map():
    bar = render.colorbar(50, "jet", height=4)
    assert bar.shape == (4, 50, 3)
    np.testing.assert_array_equal(bar[0, 0], render.to_rgb(np.zeros((1, 1)), "jet")[0, 0])
    np.testing.assert_array_equal(bar[3, -1], render.to_rgb(np.ones((1, 1)), "jet")[0, 0])


def test_css_gradient_runs_through_the_colour_map():
    gradient = render.css_gradient("inferno", stops=3)
    low, middle, high = (
        "rgb({},{},{})".format(*colour)
        for colour in render.to_rgb(np.array([[0.0, 0.5, 1.0]]), "inferno")[0]
    )
    assert gradient == f"linear-gradient(to right, {low} 0.0%, {middle} 50.0%, {high} 100.0%)"


def test_faded_overlay_shows_the_photo_where_the_map_is_zero():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    values = np.zeros((8, 8), np.float32)
    values[0, 0], values[0, 1] = 1.0, -1.0
    picture = render.faded_overlay(photo, values, render.DIVERGING)
    grey = photo.astype(np.float64) @ [0.299, 0.587, 0.114]
    washed = 255 - render.WASH * (255 - grey)
    np.testing.assert_allclose(picture[1:, :, 0], washed[1:], atol=0.51)  # grey: R = G = B
    np.testing.assert_array_equal(picture[1:, :, 0], picture[1:, :, 2])
    ends = render.to_rgb(np.array([[1.0, -1.0]]), render.DIVERGING)[0]
    np.testing.assert_array_equal(picture[0, :2], ends)  # |v| = 1 covers the photo
    with pytest.raises(ValueError, match="differ in size"):
        render.faded_overlay(photo, values[:4], render.DIVERGING)
