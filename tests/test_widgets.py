"""The ipywidgets explorer, driven from Python as a user would click it: each control change
re-runs the library and the overlay, raw map, table and status show exactly what
`cnnscan.explain` / `cnnscan.predict` give for that choice; errors land in the status line;
the user's model is left as it was."""

from __future__ import annotations

import datetime as dt
import io

import numpy as np
import pytest
import torch
import torchvision
from helpers import assert_unchanged, parse, png_pixels, snapshot
from PIL import Image

import cnnscan
from cnnscan import render
from cnnscan import widgets as widgets_module
from cnnscan.widgets import DEFAULT_LAYER, GIVEN, PANEL_PX, Explorer, explorer


def panel(rgb: np.ndarray) -> np.ndarray:
    return render.enlarge(rgb[None], PANEL_PX)[0]


def expected_overlay(model, picture, method, target, layer=None) -> np.ndarray:
    attr = cnnscan.explain(model, picture, method, [target], layer=layer)
    return panel(attr.image(0, 0, "heatmap", background=model.view(picture)))


def shows(ex: Explorer, model, picture, method, target, layer=None) -> None:
    """The explorer's overlay equals the library's for this choice (±1: the background is
    the un-normalized input, the reference the PIL view) and the raw map is the signed map."""
    got = png_pixels(ex.overlay.value).astype(int)
    want = expected_overlay(model, picture, method, target, layer).astype(int)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1
    attr = cnnscan.explain(model, picture, method, [target], layer=layer)
    raw = panel(render.to_rgb(render.view(attr.maps[0, 0], "signed"), render.DIVERGING))
    assert np.array_equal(png_pixels(ex.raw.value), raw)


def failed(ex: Explorer) -> bool:
    return ex.status.value.startswith('<span style="color:#b00">error: ')


def top_table(ex: Explorer) -> list[list[str]]:
    rows = parse(ex.table.value).tables[0]["rows"][1:]
    return [[cell["text"] for cell in row] for row in rows]


@pytest.fixture(scope="module")
def ex(default_model):
    return explorer(default_model)


def test_opens_on_the_cat_with_gradcam_for_the_top_class(ex, default_model, chelsea, cat_top1):
    assert ex.model.value == GIVEN and ex.image.value == "sample:chelsea"
    assert ex.method.value == "gradcam" and ex.target.value == cat_top1[0]
    shows(ex, default_model, chelsea, "gradcam", cat_top1[0])
    table = top_table(ex)
    expected = cnnscan.predict(default_model, chelsea)[0]
    assert [row[1] for row in table] == [str(p["class_id"]) for p in expected]
    assert "<b>gradcam</b>" in ex.status.value and "Selvaraju" in ex.status.value
    assert isinstance(ex.attribution, cnnscan.Attribution)


def test_methods_come_from_the_registry_grouped_by_family(ex):
    infos = cnnscan.list_methods()
    assert [value for _, value in ex.method.options] == [i.name for i in infos]
    for (label, _), info in zip(ex.method.options, infos, strict=True):
        slow = " (slow)" if not info.in_default_scan else ""
        assert label == f"{info.family}: {info.name}{slow}"
    assert any(label.endswith("(slow)") for label, _ in ex.method.options)  # e.g. scorecam
    families = [label.split(":")[0] for label, _ in ex.method.options]
    assert families == sorted(families, key=families.index)  # each family in one block


def test_targets_are_the_top5_then_every_class(ex, default_model):
    top5 = cnnscan.predict(default_model, "sample:chelsea")[0]
    values = [value for _, value in ex.target.options]
    assert values[:5] == [p["class_id"] for p in top5]
    assert values[5:] == list(range(1000))
    best = top5[0]
    label = f"1. {best['class_id']} {best['label']} ({best['probability']:.3f})"
    assert ex.target.options[0][0] == label


def test_changing_method_target_and_layer_updates_the_outputs(ex, default_model, chelsea, cat_top1):
    before = ex.overlay.value
    ex.method.value = "gradient"
    assert ex.layer.disabled  # input-space method: no layer to choose
    assert ex.overlay.value != before
    shows(ex, default_model, chelsea, "gradient", cat_top1[0])
    ex.target.value = 281  # tabby, from the top 5
    shows(ex, default_model, chelsea, "gradient", 281)
    ex.target.value = 1  # any class: goldfish
    shows(ex, default_model, chelsea, "gradient", 1)
    assert "1 goldfish" in ex.status.value
    ex.method.value = "layercam"
    assert not ex.layer.disabled
    assert ex.layer.options[0] == DEFAULT_LAYER and "_blocks.10" in ex.layer.options
    ex.layer.value = "_blocks.10"
    assert "<code>_blocks.10</code>" in ex.status.value
    shows(ex, default_model, chelsea, "layercam", 1, layer="_blocks.10")
    ex.layer.value = DEFAULT_LAYER
    shows(ex, default_model, chelsea, "layercam", 1)


def test_changing_the_image_updates_table_targets_and_maps(ex, default_model):
    ex.method.value = "gradcam"
    ex.image.value = "sample:coffee"
    assert ex.target.value == 967 and ex.layer.value == DEFAULT_LAYER
    assert top_table(ex)[0][1:3] == ["967", "espresso"]
    shows(ex, default_model, "sample:coffee", "gradcam", 967)
    ex.image.value = "sample:chelsea"


def upload(ex: Explorer, name: str, data: bytes) -> None:
    ex.upload.value = (
        {
            "name": name,
            "type": "image/png",
            "size": len(data),
            "content": memoryview(data),
            "last_modified": dt.datetime.now(dt.timezone.utc),
        },
    )


def test_an_uploaded_image_is_explained(ex, default_model):
    picture = cnnscan.load_image("sample:coffee").rotate(90, expand=True)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    upload(ex, "mug.png", buffer.getvalue())
    assert ex.image.value == "upload:mug.png"
    assert ("upload: mug.png", "upload:mug.png") in ex.image.options
    expected = cnnscan.predict(default_model, picture)[0]
    assert [row[1] for row in top_table(ex)] == [str(p["class_id"]) for p in expected]
    shows(ex, default_model, picture, "gradcam", expected[0]["class_id"])


def test_errors_go_to_the_status_line_and_the_explorer_keeps_working(ex, default_model):
    upload(ex, "broken.png", b"not an image at all")
    assert failed(ex) and "the uploaded bytes is not an image cnnscan can read" in ex.status.value
    # the unreadable upload is dropped and the shown image stays selected and explained
    assert ex.image.value == "upload:mug.png"
    assert "upload:broken.png" not in [value for _, value in ex.image.options]
    ex.method.value = "gradient"
    assert not failed(ex)
    ex.image.value = "sample:chelsea"
    ex.target.value = 285
    shows(ex, default_model, "sample:chelsea", "gradient", 285)


def test_a_model_that_cannot_load_is_reported_and_the_choice_reverted(
    ex, default_model, monkeypatch
):
    def refuse(name, weights):
        raise cnnscan.ModelError(f"no {weights} weights for {name} offline")

    monkeypatch.setattr(widgets_module, "load_model", refuse)
    shown = ex.overlay.value
    ex.model.value = "resnet18"
    assert failed(ex) and "no imagenet weights for resnet18 offline" in ex.status.value
    assert ex.model.value == GIVEN and ex.loaded is default_model
    assert ex.overlay.value == shown
    ex.method.value = "gradcam"
    assert not failed(ex)


def test_choosing_another_model_by_name():
    ex = explorer(image="sample:chelsea")
    assert ex.model.value == "efficientnet_lite0" and ex.image.value == GIVEN
    assert "resnet18" in ex.model.options
    ex.weights.value = "none"
    ex.model.value = "resnet18"
    assert "layer4" in ex.layer.options and "<code>layer4</code>" in ex.status.value
    torch.manual_seed(0)
    reference = cnnscan.load_model("resnet18", weights=None)
    reference.module.load_state_dict(ex.loaded.module.state_dict())
    shows(ex, reference, "sample:chelsea", "gradcam", ex.target.value)


def test_the_users_model_is_unchanged():
    net = torchvision.models.resnet18(weights=None).eval()
    before = snapshot(net)
    ex = explorer(net, Image.new("RGB", (64, 48), (200, 30, 30)))
    for method in ("gradient", "guided_backprop", "gradcam", "lrp"):
        ex.method.value = method
        assert not failed(ex), ex.status.value
    assert_unchanged(before, net)
