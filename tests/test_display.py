"""Rich display: the PNG and HTML reprs of attributions, predictions, filter and feature-map
grids and synthesized images decode to exactly the pictures the library draws, with the
right labels, scores and escaping; `predict` still returns a plain-compatible list."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import SmallConvNet, decode, parse, png_pixels

import cnnscan
from cnnscan import display, render
from cnnscan.scan import make_scan


@pytest.fixture(scope="module")
def two_by_three(default_model, chelsea):
    coffee = cnnscan.load_image("sample:coffee")
    return cnnscan.explain(default_model, [chelsea, coffee], "gradcam", targets="top3")


def test_the_background_is_the_picture_the_model_saw(default_model, chelsea, two_by_three):
    seen = np.asarray(default_model.view(chelsea)).astype(int)
    back = display.background(two_by_three, 0).astype(int)
    assert back.shape == seen.shape
    assert np.abs(back - seen).max() <= 1  # float round trip of normalize/denormalize


def test_attribution_png_is_the_grid_of_overlays(default_model, chelsea, two_by_three):
    attr = two_by_three
    grid = png_pixels(attr._repr_png_())
    # the same tiles laid out by hand: image rows, target columns, report-style overlays
    tiles = []
    for i in range(2):
        back = display.background(attr, i)
        for t in range(3):
            overlay = attr.image(i, t, "heatmap", background=back)
            tiles.append(render.enlarge(overlay[None], display.TILE_PX)[0])
    expected = render.tile_grid(np.stack(tiles), 3, labels=[""] * 6)  # blank label strips
    assert grid.shape == expected.shape
    # the tiles (below each 12-pixel label strip) are exactly the overlays
    h = display.TILE_PX
    cell = h + 12 + 2
    for row in range(2):
        top = 2 + row * cell + 12
        assert np.array_equal(grid[top : top + h], expected[top : top + h])
    # the overlay really is the heat map over the photo: the cat's face is the hot part
    heat = attr.upsample()[0, 0, 0]
    assert heat[60:160, 60:160].mean() > heat.mean()


def test_attribution_html_lists_every_map_with_label_and_logit(two_by_three):
    attr = two_by_three
    page = attr._repr_html_()
    assert "<b>gradcam</b>" in page and "<code>_swish@1</code>" in page
    table = parse(page).tables[0]
    assert len(table["rows"]) == 2
    for i, row in enumerate(table["rows"]):
        assert row[0]["text"] == f"image {i}"
        cells = row[1:]
        assert len(cells) == 3
        for t, cell in enumerate(cells):
            class_id = int(attr.targets[i, t])
            logit = float(attr.scores[i, t])
            assert cell["text"] == f"{class_id} {attr.labels[class_id]}, logit {logit:.4g}"
            picture = decode(cell["images"][0]["src"])
            back = display.background(attr, i)
            overlay = attr.image(i, t, "heatmap", background=back)
            assert np.array_equal(picture, render.enlarge(overlay[None], display.TILE_PX)[0])
    first = int(attr.targets[0, 0])
    alt = parse(page).tables[0]["rows"][0][1]["images"][0]["alt"]
    assert alt.startswith(f"{first} {attr.labels[first]}")


def test_input_space_maps_use_the_methods_view_and_extras_are_listed(default_model, chelsea):
    attr = cnnscan.explain(default_model, chelsea, "integrated_gradients", n_steps=4)
    info = cnnscan.get_method("integrated_gradients")
    cell = parse(attr._repr_html_()).tables[0]["rows"][0][1]
    expected = render.enlarge(attr.image(0, 0, info.view)[None], display.TILE_PX)[0]
    assert np.array_equal(decode(cell["images"][0]["src"]), expected)
    relative = float(attr.extras["completeness_error_relative"][0, 0])
    assert f"<code>completeness_error_relative</code>: {relative:.4g}" in attr._repr_html_()


def test_labels_are_escaped_and_large_attributions_are_capped():
    net = SmallConvNet(classes=3)
    model = cnnscan.load_model(net, labels=["<b>a</b>", "b & c", "c"])
    x = torch.randn(30, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    attr = cnnscan.explain(model, x, "gradient", targets="top3")
    page = attr._repr_html_()
    assert "<b>a</b>" not in page and "&lt;b&gt;a&lt;/b&gt;" in page
    assert "b &amp; c" in page
    cells = sum(len(row) - 1 for row in parse(page).tables[0]["rows"])
    assert cells == display.MAX_TILES
    assert f"first {display.MAX_TILES} of 90 maps shown" in page
    grid = png_pixels(attr._repr_png_())
    rows = -(-display.MAX_TILES // 3)
    assert grid.shape[0] == rows * (display.TILE_PX + 12 + 2) + 2
    # without preprocessing (a hand-made Attribution) the inputs are min-max scaled
    bare = cnnscan.Attribution(attr.maps[:1], attr.targets[:1], "gradient", x[:1])
    back = display.background(bare, 0)
    assert back.min() == 0 and back.max() == 255


def test_predict_returns_a_list_that_renders_as_a_table(default_model, chelsea):
    table = cnnscan.predict(default_model, chelsea)
    plain = make_scan(default_model, chelsea).predictions(5)
    assert isinstance(table, list) and table == plain
    assert json.loads(json.dumps(table)) == plain
    html = parse(table._repr_html_())
    rows = html.tables[0]["rows"]
    assert [c["text"] for c in rows[0]] == ["rank", "class", "label", "probability", "", "logit"]
    for row, p in zip(rows[1:], plain[0], strict=True):
        text = [c["text"] for c in row]
        assert text[:4] == [
            str(p["rank"]),
            str(p["class_id"]),
            p["label"],
            f"{p['probability']:.4f}",
        ]
        assert text[5] == f"{p['logit']:.3f}"
    from IPython.lib.pretty import pretty

    best = plain[0][0]
    assert pretty(table).splitlines()[0].startswith(f"1.  {best['class_id']} {best['label']}")


def test_predictions_of_several_images_get_one_captioned_table_each(default_model, chelsea):
    table = cnnscan.predict(default_model, [chelsea, "sample:coffee"], k=2)
    html = table._repr_html_()
    assert html.count("<table") == 2 and "<caption>image 1</caption>" in html
    assert parse(html).tables[1]["rows"][1][2]["text"] == "espresso"


def test_show_filters_draws_the_weights_of_the_layer(default_model):
    picture = cnnscan.show_filters(default_model)
    weights = default_model.module._conv_stem.weight
    assert np.array_equal(png_pixels(picture._repr_png_()), render.filter_grid(weights))
    assert picture.title == "_conv_stem: 32 filters of 3×3×3, 32 shown"
    deep = cnnscan.show_filters(default_model, "_blocks.1._project_conv", "mean", max_filters=8)
    expected = render.filter_grid(
        default_model.module._blocks[1]._project_conv.weight, "mean", max_filters=8
    )
    assert np.array_equal(np.asarray(deep), expected)
    figure = parse(deep._repr_html_())
    assert np.array_equal(decode(figure.images[0]["src"]), expected)
    out, inp = default_model.module._blocks[1]._project_conv.weight.shape[:2]
    caption = f"_blocks.1._project_conv: {out} filters of {inp}×1×1, 8 shown"
    assert f"<figcaption>{caption}</figcaption>" in deep._repr_html_()


def test_show_feature_maps_draws_the_strongest_channels(default_model, chelsea, tmp_path):
    layer = "_blocks.2"
    picture = cnnscan.show_feature_maps(default_model, chelsea, layer, top=6, scale="per-map")
    # reference: the layer's output from a hook on a plain forward
    captured = {}
    module = default_model.module._blocks[2]
    handle = module.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    with torch.no_grad():
        default_model.module(default_model.preprocess(chelsea))
    handle.remove()
    maps = captured["out"][0]
    strongest = torch.argsort(maps.mean(dim=(1, 2)), descending=True)[:6]
    expected = render.feature_grid(maps, strongest, scale="per-map")
    assert np.array_equal(picture.pixels, expected)
    assert picture.title == f"{layer}: {'×'.join(map(str, maps.shape))}, 6 strongest channels"
    saved = picture.save(tmp_path / "grid.png")
    assert np.array_equal(png_pixels(saved.read_bytes()), expected)
    with pytest.raises(cnnscan.LayerError, match="not feature maps"):
        cnnscan.show_feature_maps(default_model, chelsea, "_fc")


def test_synthesis_shows_its_images(default_model):
    result = cnnscan.class_image(default_model, 285, steps=2, size=32)
    assert np.array_equal(png_pixels(result._repr_png_()), result.image)
    batch = cnnscan.synthesize(default_model, "_blocks.2@0:3", steps=2, size=32, batch=2)
    row = png_pixels(batch._repr_png_())
    assert np.array_equal(row, render.tile_grid(np.stack(batch.images)))


def test_summary_lists_per_target_values_and_names_maps_by_shape():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    net = SmallConvNet().eval()
    ig = cnnscan.explain(net, x, "integrated_gradients", targets=[1, 3], n_steps=4)
    error = ig.summary()["extras"]["completeness_error"]
    assert error == ig.extras["completeness_error"].tolist()  # (2, 2): one per image and target
    cam = cnnscan.explain(net, x, "gradcam", targets=[1, 3])
    assert cam.summary()["extras"]["raw"] == f"tensor {tuple(cam.extras['raw'].shape)}"


def test_terminal_picture_draws_two_pixel_rows_per_text_row():
    rgb = np.array(
        [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], dtype=np.uint8
    )  # 2×2: red green / blue dark
    text = render.terminal_picture(rgb, columns=2)
    assert text.count("\n") == 0 and text.count("▀") == 2
    assert text.startswith("\x1b[38;2;255;0;0m\x1b[48;2;0;0;255m▀")
    assert "\x1b[38;2;0;255;0m\x1b[48;2;10;20;30m▀" in text and text.endswith("\x1b[0m")
    assert render.terminal_picture(np.zeros((100, 50, 3), np.uint8), 10).count("\n") == 9
