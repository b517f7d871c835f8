"""The Streamlit page driven by Streamlit's AppTest (no browser): widgets -> computations ->
what the page shows. Pictures are compared, pixel for pixel, with the same views computed
by calling the library directly (`cnnscan.explain`, `render`, `filters`, `feature_maps`,
`class_image`)."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pytest
import torch
from helpers import UnpickleMarker, header_only_png
from PIL import Image
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest

import cnnscan
from cnnscan import render
from cnnscan.app import PAGE, core, sources

TIMEOUT = 600


@pytest.fixture
def media(monkeypatch) -> dict[str, bytes]:
    """Every file the page hands to Streamlit's media storage, by file id."""
    store: dict[str, bytes] = {}
    original = MemoryMediaFileStorage.load_and_get_id

    def recording(self, path_or_data, mimetype, kind, filename=None):
        file_id = original(self, path_or_data, mimetype, kind, filename)
        if not isinstance(path_or_data, str):
            store[file_id] = bytes(path_or_data)
        return file_id

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", recording)
    return store


def pictures_shown(at: AppTest, media: dict[str, bytes]) -> dict[str, np.ndarray]:
    """alt text -> RGB pixels of every picture on the page."""
    shown = {}
    for element in at.get("image"):
        for image in element.proto.imgs:
            file_id = image.url.rsplit("/", 1)[-1].split(".")[0]
            shown[image.alt] = np.asarray(Image.open(io.BytesIO(media[file_id])).convert("RGB"))
    return shown


def fresh_app() -> AppTest:
    at = AppTest.from_file(str(PAGE), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def no_problems(at: AppTest) -> None:
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def reference_overlay(model, image, method, target, layer=None, alpha=0.5, cmap="jet"):
    attr = cnnscan.explain(model, image, method, targets=[target], layer=layer)
    return render.overlay(model.view(image), attr.view(0, 0, "heatmap"), alpha=alpha, cmap=cmap)


def top_part(picture: np.ndarray, like: np.ndarray) -> np.ndarray:
    return picture[: like.shape[0], : like.shape[1]]


@pytest.fixture(autouse=True)
def _fresh_results(monkeypatch):
    """Each test starts with an empty result cache (the model stays loaded)."""
    monkeypatch.setattr(core, "RESULTS", core.ResultCache())


def test_first_screen_shows_the_top5_and_gradcam_of_the_top1(
    media, default_model, chelsea, cat_top1
):
    at = fresh_app()
    no_problems(at)
    table = at.table[0].value
    expected = cnnscan.predict(default_model, chelsea)[0]
    assert list(table["label"]) == [row["label"] for row in expected]
    cat, label = cat_top1
    assert table["label"][0] == label
    caption = f"Preprocessing: {default_model.preprocessing.describe(origin=True)}"
    assert caption in [c.value for c in at.caption]
    assert float(table["probability"][0]) == pytest.approx(expected[0]["probability"], abs=1e-3)
    assert [t.label for t in at.tabs][:4] == [
        "Explanations",
        "Layers",
        "Filters & feature maps",
        "Synthesis",
    ]
    shown = pictures_shown(at, media)
    cells = [alt for alt in shown if " for " in alt]
    assert cells == [f"gradcam for {label}"]
    reference = reference_overlay(default_model, chelsea, "gradcam", cat)
    np.testing.assert_array_equal(top_part(shown[f"gradcam for {label}"], reference), reference)
    assert shown[f"gradcam for {label}"].shape[0] > reference.shape[0] + 10  # colour bar
    np.testing.assert_array_equal(shown["model input"], np.asarray(default_model.view(chelsea)))
    assert [b.label for b in at.get("download_button")][-2:] == [
        "Download the run (zip)",
        "Download the HTML report",
    ]


def test_widgets_drive_the_grid_and_reruns_reuse_results(
    media, default_model, chelsea, monkeypatch
):
    calls = []
    original = core.run_method

    def counting(scan, info, targets, *args, **kwargs):
        calls.append((info.name, targets.tolist()[0]))
        return original(scan, info, targets, *args, **kwargs)

    monkeypatch.setattr(core, "run_method", counting)
    at = fresh_app()
    at.slider(key="top_k").set_value(2)
    at.multiselect(key="methods_gradient").set_value(["gradient"])
    at.radio(key="view").set_value("heatmap")
    at.selectbox(key="cmap").set_value("inferno")
    at.run()
    no_problems(at)
    (first, second, third) = cnnscan.predict(default_model, chelsea, k=3)[0]
    shown = pictures_shown(at, media)
    cells = sorted(alt for alt in shown if " for " in alt)
    labels = (first["label"], second["label"])
    assert cells == sorted(f"{m} for {x}" for m in ("gradient", "gradcam") for x in labels)
    for method in ("gradient", "gradcam"):
        attr = cnnscan.explain(default_model, chelsea, method, targets=[second["class_id"]])
        reference = render.to_rgb(attr.view(0, 0, "heatmap"), "inferno")
        cell = shown[f"{method} for {second['label']}"]
        np.testing.assert_array_equal(top_part(cell, reference), reference)
    ids = [first["class_id"], second["class_id"]]
    assert sorted(calls) == sorted([("gradcam", ids[:1]), ("gradcam", ids[1:]), ("gradient", ids)])
    assert [b.label for b in at.get("download_button")].count("PNG") == 4  # one per cell

    calls.clear()
    at.radio(key="view").set_value("overlay")
    at.slider(key="alpha").set_value(0.8)
    at.run()
    assert calls == []  # a new view of the same cells: nothing recomputed
    shown = pictures_shown(at, media)
    reference = reference_overlay(
        default_model, chelsea, "gradcam", second["class_id"], alpha=0.8, cmap="inferno"
    )
    cell = shown[f"gradcam for {second['label']}"]
    np.testing.assert_array_equal(top_part(cell, reference), reference)

    at.slider(key="top_k").set_value(3)
    at.run()
    new = [third["class_id"]]
    assert sorted(calls) == [("gradcam", new), ("gradient", new)]  # only the new target


def test_every_registered_family_is_offered_and_runs(media, default_model, chelsea, cat_top1):
    """Methods come from the registry: a family that landed after the page was written (LRP)
    is offered and explained without any change to the page."""
    at = fresh_app()
    families = list(dict.fromkeys(m.family for m in cnnscan.list_methods()))
    offered = {w.key.removeprefix("methods_"): w.options for w in at.multiselect if w.key}
    for family in families:
        names = [m.name for m in cnnscan.list_methods(family)]
        assert [o.removesuffix(" (slow)") for o in offered[family]] == names
    at.multiselect(key="methods_cam").set_value([])
    at.multiselect(key="methods_lrp").set_value(["lrp"])
    at.run()
    no_problems(at)
    attr = cnnscan.explain(default_model, chelsea, "lrp", targets=[cat_top1[0]])
    reference = render.overlay(default_model.view(chelsea), attr.view(0, 0, "heatmap"))
    shown = pictures_shown(at, media)[f"lrp for {cat_top1[1]}"]
    np.testing.assert_array_equal(top_part(shown, reference), reference)


def test_classes_by_name_and_several_layers(media, default_model, chelsea):
    at = fresh_app()
    at.radio(key="target_mode").set_value("classes").run()
    at.multiselect(key="classes").set_value(["281: tabby"])
    at.multiselect(key="layers").set_value(["_blocks.10", "_swish@1"])
    at.run()
    no_problems(at)
    shown = pictures_shown(at, media)
    assert sorted(alt for alt in shown if " for " in alt) == [
        "gradcam @ _blocks.10 for tabby",
        "gradcam @ _swish@1 for tabby",
    ]
    reference = reference_overlay(default_model, chelsea, "gradcam", 281, layer="_blocks.10")
    np.testing.assert_array_equal(
        top_part(shown["gradcam @ _blocks.10 for tabby"], reference), reference
    )


def test_method_options_reach_the_method_and_bad_ones_show_a_message(
    media, default_model, chelsea, cat_top1
):
    at = fresh_app()
    at.session_state["options_integrated_gradients"] = '{"n_steps": 4, "baseline": "blur"}'
    at.multiselect(key="methods_gradient").set_value(["integrated_gradients"]).run()
    no_problems(at)
    attr = cnnscan.explain(
        default_model,
        chelsea,
        "integrated_gradients",
        targets=[cat_top1[0]],
        n_steps=4,
        baseline="blur",
    )
    reference = render.overlay(default_model.view(chelsea), attr.view(0, 0, "heatmap"))
    shown = pictures_shown(at, media)[f"integrated_gradients for {cat_top1[1]}"]
    np.testing.assert_array_equal(top_part(shown, reference), reference)
    at.text_input(key="options_integrated_gradients").set_value('{"n_step": 4}').run()
    assert any("has no option n_step; its options: n_steps" in e.value for e in at.error)
    at.text_input(key="options_integrated_gradients").set_value("n_steps=4").run()
    assert any("options must be a JSON object" in e.value for e in at.error)
    assert not at.exception


def png(image) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, "PNG")
    return buffer.getvalue()


def test_an_upload_is_explained(media, default_model):
    coffee = cnnscan.sample_image("coffee")
    at = fresh_app()
    at.file_uploader(key="upload").set_value(("coffee.png", png(coffee), "image/png")).run()
    no_problems(at)
    assert at.radio(key="image_source").value == "upload"
    assert at.table[0].value["label"][0] == "espresso"
    shown = pictures_shown(at, media)
    reference = reference_overlay(default_model, coffee, "gradcam", 967)
    np.testing.assert_array_equal(top_part(shown["gradcam for espresso"], reference), reference)


def _truncated() -> bytes:
    data = png(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8))
    return data[: len(data) // 2]


def _bomb() -> bytes:

    return header_only_png(10_000, 10_000)


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("notes.png", lambda: b"not a picture", "notes.png is not an image"),
        ("cut.png", _truncated, "damaged or truncated"),
        ("bomb.png", _bomb, "above the 90 MP limit"),
        ("big.png", lambda: b"\x89PNG" + b"\x00" * (2**20 + 10), "above the 1 MB upload limit"),
    ],
)
def test_bad_uploads_show_a_message_and_the_app_keeps_working(
    name, make, message, media, monkeypatch, cat_top1
):
    monkeypatch.setenv(sources.ENV_MAX_UPLOAD_MB, "1")
    at = fresh_app()
    at.file_uploader(key="upload").set_value((name, make(), "image/png")).run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert any(message in e and "The sample photo is shown instead" in e for e in errors), errors
    assert at.table[0].value["label"][0] == cat_top1[1]  # still working, on the sample
    assert f"gradcam for {cat_top1[1]}" in pictures_shown(at, media)
    at.file_uploader(key="upload").set_value(
        ("coffee.png", png(cnnscan.sample_image("coffee")), "image/png")
    ).run()
    assert not at.error and at.table[0].value["label"][0] == "espresso"


def test_no_server_files_unless_started_with_allow_local_files(monkeypatch, tmp_path):
    at = fresh_app()
    assert at.radio(key="weights").options == ["ImageNet (bundled)", "random (untrained)"]
    assert not at.text_input  # no path can be typed
    monkeypatch.setenv(sources.ENV_ALLOW_LOCAL_FILES, "1")
    at = fresh_app()
    assert at.radio(key="weights").options[-1] == "a weights file on the server"
    at.radio(key="weights").set_value("file").run()
    at.text_input(key="weights_path").set_value("/etc/passwd").run()
    assert [e.value for e in at.error] == [
        "'passwd' is not a weights file; name a state dict (.pt, .pth, .safetensors)"
    ]
    assert not at.tabs  # nothing runs on a model that did not load

    marker, file = tmp_path / "unpickled", tmp_path / "model.pt"
    torch.save(UnpickleMarker(marker), file)
    at.text_input(key="weights_path").set_value(str(file)).run()
    assert "not a plain state_dict" in at.error[0].value
    assert not marker.exists()


def test_a_torchvision_model_with_random_weights(media):
    at = fresh_app()
    at.selectbox(key="model_name").set_value("resnet18")
    at.radio(key="weights").set_value("random")
    at.run()
    no_problems(at)
    ws = at.session_state["workspace"]
    assert ws.model.name == "resnet18" and ws.model_key == "resnet18|random"
    assert "layer4" in list(at.dataframe[0].value["layer"])
    top1 = cnnscan.predict(ws.model, ws.picture.image)[0][0]
    assert at.table[0].value["label"][0] == top1["label"]
    shown = pictures_shown(at, media)[f"gradcam for {top1['label']}"]
    reference = reference_overlay(ws.model, ws.picture.image, "gradcam", top1["class_id"])
    np.testing.assert_array_equal(top_part(shown, reference), reference)


def test_layer_table_with_receptive_fields(default_model, chelsea):
    at = fresh_app()
    frame = at.dataframe[0].value
    rows = cnnscan.Scan(default_model, default_model.preprocess(chelsea)).layer_table()
    assert list(frame["layer"]) == [row.name for row in rows]
    fields = cnnscan.receptive_fields(default_model)
    head = frame.set_index("layer").loc["_conv_head"]
    assert head["receptive field"] == fields["_conv_head"].describe()
    assert head["parameters"] == sum(
        p.numel() for p in default_model.module._conv_head.parameters()
    )


def test_filters_and_feature_maps_follow_the_controls(media, default_model, chelsea):
    at = fresh_app()
    at.selectbox(key="filter_layer").set_value("_blocks.1._project_conv")
    at.selectbox(key="filter_mode").set_value("mean")
    at.slider(key="filter_count").set_value(12)
    at.selectbox(key="feature_layer").set_value("_blocks.5._swish@0")
    at.slider(key="feature_top").set_value(6)
    at.radio(key="feature_scale").set_value("per-map")
    at.run()
    no_problems(at)
    shown = pictures_shown(at, media)
    weights = cnnscan.filters(default_model, "_blocks.1._project_conv")
    np.testing.assert_array_equal(
        shown["filters of _blocks.1._project_conv"],
        render.filter_grid(weights, "mean", max_filters=12),
    )
    maps = cnnscan.feature_maps(default_model, chelsea, "_blocks.5._swish@0")["_blocks.5._swish@0"]
    channels = cnnscan.top_channels(maps[0], 6)
    np.testing.assert_array_equal(
        shown["feature maps of _blocks.5._swish@0"],
        render.feature_grid(maps[0], channels, scale="per-map"),
    )


def test_concepts_tab_shows_the_picked_concept(media, default_model, chelsea):
    """Nothing is computed until asked; then each concept's heatmap and footprint are the
    library's (`cnnscan.concepts` and the concepts page's pictures), for the one picked."""
    from cnnscan.concept.page import footprint_picture, heatmap_picture

    at = fresh_app()
    assert not [a for a in pictures_shown(at, media) if a.startswith("heatmap")]
    at.slider(key="concept_top").set_value(3)
    at.button(key="concept_go").click()
    at.run()
    no_problems(at)
    found = cnnscan.concepts(default_model, chelsea, top=3, pictures=False)
    assert "lowers the logit by" in " ".join(m.value for m in at.markdown)
    for pick in (0, 2):
        at.radio(key="concept_pick").set_value(pick)
        at.run()
        no_problems(at)
        shown = pictures_shown(at, media)
        concept = found[0].concepts[pick]
        heatmap = f"heatmap: relevance only through this channel of channel {concept.channel}"
        footprint = f"footprint at {found.layer} of channel {concept.channel}"
        np.testing.assert_array_equal(shown[heatmap], heatmap_picture(found, concept))
        np.testing.assert_array_equal(shown[footprint], footprint_picture(found, concept))


def _wait_for_job(at: AppTest, seconds: float = 300) -> str:
    deadline = time.monotonic() + seconds
    job = at.session_state["job"]
    while job.running and time.monotonic() < deadline:
        time.sleep(0.2)
    at.run()
    return job.state


def test_synthesis_runs_in_the_background_and_shows_the_image(media, default_model, cat_top1):
    at = fresh_app()
    at.radio(key="synth_kind").set_value("class image").run()
    at.slider(key="synth_steps_class image").set_value(4)
    at.select_slider(key="synth_size").set_value(96)
    at.button(key="synth_run").click().run()
    assert not at.exception
    assert _wait_for_job(at) == "done"
    no_problems(at)
    shown = pictures_shown(at, media)
    expected = cnnscan.class_image(default_model, cat_top1[0], steps=4, size=96, seed=0)
    shown_image = shown[f"synthesized: class image of {cat_top1[0]}"]
    np.testing.assert_array_equal(shown_image, expected.image)
    assert len(at.get("vega_lite_chart")) == 1  # the objective's history


def test_synthesis_progress_and_stop():
    at = fresh_app()
    at.radio(key="synth_kind").set_value("channel").run()
    at.slider(key="synth_steps_channel").set_value(500)
    at.select_slider(key="synth_size").set_value(96)
    at.button(key="synth_run").click().run()
    job = at.session_state["job"]
    progress = [p for p in at.get("progress") if "step" in p.proto.text]
    assert job.running and progress and "of 500" in progress[0].proto.text
    at.button(key="synth_stop").click().run()
    assert _wait_for_job(at) == "stopped"
    assert any("Stopped channel" in w.value for w in at.warning)
    assert job.step < 500 and not at.exception


def test_evaluation_tab_appears_with_the_library_evaluation(monkeypatch):
    has_it = callable(getattr(cnnscan, "evaluate", None))
    at = fresh_app()
    assert ("Evaluation" in [t.label for t in at.tabs]) == has_it
    if has_it:
        # The package resolves names lazily (PEP 562), so hide it rather than delete it.
        monkeypatch.setattr(cnnscan, "evaluate", None)
        assert "Evaluation" not in [t.label for t in fresh_app().tabs]


def test_leaderboard_table_and_curves_from_rows():
    from cnnscan.app import evaluation

    rows = [
        {
            "method": "gradcam",
            "rank": 1,
            "reference": False,
            "deletion_auc": 0.1,
            "insertion_auc": 0.7,
            "score": 0.6,
            "model_randomization": {"verdict": "passes", "spearman": [0.31], "ssim": [0.2]},
            "completeness": None,
            "curves": {
                "fraction": [0, 0.5, 1],
                "deletion": [0.8, 0.2, 0.0],
                "insertion": [0, 0.6, 0.8],
            },
        },
        {
            "method": "random",
            "rank": 2,
            "reference": True,
            "deletion_auc": 0.3,
            "insertion_auc": 0.4,
            "score": 0.1,
            "curves": {
                "fraction": [0, 0.5, 1],
                "deletion": [0.8, 0.5, 0.0],
                "insertion": [0, 0.3, 0.8],
            },
        },
    ]
    assert evaluation.table(rows) == [
        {
            "rank": 1,
            "method": "gradcam",
            "deletion↓": 0.1,
            "insertion↑": 0.7,
            "ins−del↑": 0.6,
            "top-layer rand. ρ": "0.31 passes",
            "complete err↓": None,
        },
        {
            "rank": 2,
            "method": "random (chance)",
            "deletion↓": 0.3,
            "insertion↑": 0.4,
            "ins−del↑": 0.1,
            "top-layer rand. ρ": None,
            "complete err↓": None,
        },
    ]
    rows[0].update(trusted=False, warnings=["completeness error 20.00% (above 5%)"])
    assert evaluation.table(rows)[0]["method"] == "gradcam ✗⚠"
    assert evaluation.table(rows)[0]["warnings"] == "completeness error 20.00% (above 5%)"
    assert "**deletion↓**: lower is better." in evaluation.legend(rows)
    assert evaluation.curves(rows, "deletion") == {
        "fraction": [0, 0.5, 1],
        "gradcam": [0.8, 0.2, 0.0],
        "random": [0.8, 0.5, 0.0],
    }


@pytest.mark.slow
def test_evaluation_ranks_the_grids_methods_like_the_library(default_model, chelsea, cat_top1):
    leaderboard = pytest.importorskip("cnnscan.metrics.leaderboard").leaderboard
    at = fresh_app()
    at.multiselect(key="methods_gradient").set_value(["gradient"]).run()
    at.slider(key="eval_steps").set_value(12)
    at.run()
    assert any("Press Evaluate" in i.value for i in at.info)
    at.button(key="eval_run").click().run()
    no_problems(at)
    table = at.dataframe[-1].value
    scan = cnnscan.Scan(default_model, default_model.preprocess(chelsea))
    attrs = {
        name: cnnscan.explain(default_model, None, name, targets=[cat_top1[0]], scan=scan)
        for name in ("gradient", "gradcam")
    }
    expected = leaderboard(
        default_model, None, attrs, ["deletion_auc", "insertion_auc", "completeness"], steps=12
    )
    shown = [re.sub(r"( \(chance\))?( [✗⚠])?$", "", m) for m in table["method"]]
    assert shown == [r["method"] for r in expected]
    np.testing.assert_allclose(
        table["deletion↓"], [r["deletion_auc"] for r in expected], rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        table["insertion↑"], [r["insertion_auc"] for r in expected], rtol=1e-4, atol=1e-6
    )
    assert len(at.get("vega_lite_chart")) == 2  # deletion and insertion curves
