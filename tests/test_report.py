"""The HTML report: parses, top-k table equal to predictions.json, one panel per class with
a cell per method showing that class's map (alone and over the photo) with its colour-bar
scale, labels escaped, everything embedded; the raw maps in maps.npz."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from helpers import DOMESTIC_CATS, SmallConvNet, Tables, decode, parse
from PIL import Image

import cnnscan
from cnnscan import render
from cnnscan.report import run_scan, write_report


def prediction_table(tables: Tables) -> list[list[str]]:
    for table in tables.tables:
        header = [cell["text"].strip() for cell in table["rows"][0]]
        if header[:4] == ["rank", "class id", "label", "probability"]:
            return [[cell["text"].strip() for cell in row] for row in table["rows"][1:]]
    raise AssertionError("no predictions table")


def panels(tables: Tables) -> dict[str, list[dict]]:
    """The explanation cells by panel id ("panel0" is the first class)."""
    found: dict[str, list[dict]] = {}
    for figure in tables.figures:
        if "cell" in figure["class"].split() and (figure["panel"] or "").startswith("panel"):
            found.setdefault(figure["panel"], []).append(figure)
    assert found, "no explanation panels"
    return found


def mean_difference(a: np.ndarray, b: np.ndarray, block: int = 8) -> float:
    """Mean |a − b| of two pictures' `block`×`block` means, `b` first resized to `a`'s size
    (box filter): what resizing and lossy encoding keep of a noisy map (its pixel-level
    noise moves by ~12 levels at the report's WebP quality)."""
    if b.shape != a.shape:
        size = (a.shape[1], a.shape[0])
        b = np.asarray(Image.fromarray(b).resize(size, Image.Resampling.BOX))

    def blocks(x: np.ndarray) -> np.ndarray:
        h, w = (s // block * block for s in x.shape[:2])
        return x[:h, :w].reshape(h // block, block, w // block, block, -1).mean(axis=(1, 3))

    return float(np.abs(blocks(a.astype(np.float64)) - blocks(b.astype(np.float64))).mean())


@pytest.fixture(scope="module")
def top5_report(tmp_path_factory, default_model):
    out = tmp_path_factory.mktemp("report")
    result = run_scan(
        default_model,
        "sample:chelsea",
        methods=["gradient", "guided_backprop", "gradcam"],
        top_k=5,
        image_name="chelsea",
        class_image_steps=0,
        evaluate="none",
    )
    path = write_report(result, out)
    return path.read_text(encoding="utf-8"), out, result


def test_html_parses_and_is_well_nested(top5_report):
    html, _, _ = top5_report
    tables = parse(html)
    assert tables.open_tags == [], f"unclosed tags: {tables.open_tags}"
    assert "<title>" in html and "chelsea" in html


def test_top5_table_matches_predictions_json(top5_report, default_model, chelsea):
    html, out, _ = top5_report
    predictions = json.loads((out / "predictions.json").read_text())
    rows = prediction_table(parse(html))
    assert len(rows) == len(predictions) == 5
    for row, p in zip(rows, predictions, strict=True):
        assert int(row[0]) == p["rank"]
        assert int(row[1]) == p["class_id"]
        assert row[2] == p["label"]
        assert float(row[3]) == pytest.approx(p["probability"], abs=5e-5)
    # ... and predictions.json itself agrees with an independent forward.
    with torch.no_grad():
        probabilities = default_model.module(default_model.preprocess(chelsea)).softmax(1)[0]
    assert [p["class_id"] for p in predictions] == probabilities.topk(5).indices.tolist()
    assert int(rows[0][1]) in DOMESTIC_CATS


def test_one_panel_per_class_with_a_cell_per_method(top5_report, default_model, chelsea):
    """Each cell shows its class's map of its method: the picture is the library's view
    (lossy WebP: close to it, and closer than to the map of any other class)."""
    html, out, result = top5_report
    predictions = json.loads((out / "predictions.json").read_text())
    found = panels(parse(html))
    assert sorted(found) == [f"panel{t}" for t in range(5)]
    back = np.asarray(default_model.view(chelsea))
    for t, p in enumerate(predictions):
        cells = found[f"panel{t}"]
        assert [cell["text"].split()[0] for cell in cells] == list(result.attributions)
        for cell, (name, attr) in zip(cells, result.attributions.items(), strict=True):
            alone, over = cell["images"]
            assert name in alone["alt"] and p["label"] in alone["alt"]
            assert over["alt"] == f"{alone['alt']} over the photo"
            expected = [draw_alone(attr, k) for k in range(5)]
            errors = [mean_difference(decode(alone["src"]), e) for e in expected]
            assert errors[t] < 4 and errors[t] == min(errors), (name, errors)
            if attr.space == "layer":  # a CAM: over the photo as the CAM libraries draw it
                picture = render.overlay(back, attr.view(0, t, "heatmap"), cmap="jet")
                assert mean_difference(decode(over["src"]), picture) < 4


def draw_alone(attr: cnnscan.Attribution, target: int) -> np.ndarray:
    """A map drawn alone, independently of the report's code: CAMs min-max in jet, guided
    backprop signed (Σ_c, robust scale) on the diverging map, the gradient's magnitude."""
    if attr.space == "layer":
        return render.to_rgb(attr.view(0, target, "heatmap"), "jet")
    if attr.method == "guided_backprop":
        return render.to_rgb((attr.view(0, target, "signed") + 1) / 2, render.DIVERGING)
    return render.to_rgb(attr.view(0, target, "grayscale"), render.SEQUENTIAL)


def test_every_cell_has_a_colour_bar_with_its_scale(top5_report):
    html, _, result = top5_report
    first = panels(parse(html))["panel0"]
    for cell, (name, attr) in zip(first, result.attributions.items(), strict=True):
        kind = "signed" if name == "guided_backprop" else "heatmap"
        low, high = render.view_scale(attr.full_map(0, 0), kind)
        numbers = cell["text"].split()[1:]
        expected = (
            [f"{low:.2g}", "0", f"{high:.2g}"]
            if kind == "signed"
            else [f"{low:.2g}", f"{high:.2g}"]
        )
        assert numbers == expected, name
    assert html.count(f"cm-{render.DIVERGING} {{ background: linear-gradient(") == 1


def test_everything_is_embedded(top5_report):
    html, _, _ = top5_report
    tables = parse(html)
    assert tables.images
    for image in tables.images:
        decode(image["src"])  # a valid PNG or WebP data: URI
    assert "<script src" not in html and "<link" not in html


def test_input_picture_is_what_the_model_sees(top5_report, default_model, chelsea):
    html, _, _ = top5_report
    tables = parse(html)
    first = decode(tables.images[0]["src"])
    assert mean_difference(first, np.asarray(default_model.view(chelsea))) < 3


def test_maps_npz_holds_the_raw_maps_of_the_first_class(top5_report):
    _, out, result = top5_report
    top1 = result.predictions[0]["class_id"]
    with np.load(out / "maps.npz") as maps:
        assert sorted(maps.files) == sorted(f"{name}_class{top1}" for name in result.attributions)
        for name, attr in result.attributions.items():
            np.testing.assert_array_equal(maps[f"{name}_class{top1}"], attr.maps[0, 0].numpy())
    summaries = json.loads((out / "maps.json").read_text())
    assert summaries["gradcam"]["layer"] == result.attributions["gradcam"].layer
    assert not (out / "maps").exists()  # per-map files only with all_maps


def test_all_maps_writes_a_png_and_npy_per_map_and_class(tmp_path):
    model = cnnscan.load_model(SmallConvNet(classes=3))
    result = run_scan(
        model, "sample:coffee", methods=["gradient"], top_k=3, evaluate="none", class_image_steps=0
    )
    write_report(result, tmp_path, all_maps=True)
    attr = result.attributions["gradient"]
    for t, class_id in enumerate(attr.targets[0].tolist()):
        raw = np.load(tmp_path / "maps" / "gradient" / f"gradient_img0_class{class_id}.npy")
        np.testing.assert_array_equal(raw, attr.maps[0, t].numpy())
        assert (tmp_path / "maps" / "gradient" / f"gradient_img0_class{class_id}.png").is_file()


def test_an_all_zero_map_is_said_not_drawn(tmp_path):
    model = cnnscan.load_model(SmallConvNet(classes=3))
    result = run_scan(
        model, "sample:coffee", methods=["gradient"], top_k=2, evaluate="none", class_image_steps=0
    )
    result.attributions["gradient"].maps[:, 1] = 0
    cells = panels(parse(write_report(result, tmp_path).read_text(encoding="utf-8")))
    assert len(cells["panel0"][0]["images"]) == 2
    assert cells["panel1"][0]["images"] == []
    assert "zero everywhere" in cells["panel1"][0]["text"]


def test_labels_are_escaped(tmp_path):
    labels = ["<script>alert(1)</script>", "cat & dog", 'say "hi"']
    model = cnnscan.load_model(SmallConvNet(classes=3), labels=labels)
    result = run_scan(model, "sample:coffee", methods=["gradient"], top_k=3)
    html = write_report(result, tmp_path).read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;" in html
    rows = prediction_table(parse(html))
    assert sorted(row[2] for row in rows) == sorted(labels)


def test_the_report_says_what_lrps_conservation_figure_means(tmp_path):
    model = cnnscan.load_model(SmallConvNet(classes=3))
    result = run_scan(model, "sample:coffee", methods=["lrp", "gradient"], class_image_steps=0)
    html = write_report(result, tmp_path).read_text(encoding="utf-8")
    attr = result.attributions["lrp"]
    share = float(attr.extras["relevance_sum"][0, 0] / attr.scores[0, 0])
    text = " ".join(html.split())
    composite = "epsilon_plus_depthwise"
    assert (
        f"relevance sums to {share:.1%} of the target logit ({composite}, biases included)" in text
    )
    assert "the share of the target logit its rules do not hand down" in text


def test_quick_cli_report_has_a_cell_per_class_and_method(quick_report):
    code, out, _, stderr = quick_report
    assert code == 0, stderr
    html = (out / "report.html").read_text(encoding="utf-8")
    found = panels(parse(html))
    assert sorted(found) == ["panel0", "panel1"]
    assert all(len(cells) == 2 for cells in found.values())
    assert len(prediction_table(parse(html))) == 2


def test_the_scan_tells_the_top_k_then_gradcam_then_each_stage():
    """An observer hears the top-k before any method runs, Grad-CAM of the top-1 as the
    first map (whatever the order asked), and each stage with its total, advanced to it."""
    from cnnscan.report import ScanObserver

    events = []

    class Recorder(ScanObserver):
        def predictions(self, rows):
            events.append(("predictions", [row["class_id"] for row in rows]))

        def first_map(self, attr, view):
            events.append(("first_map", attr.method, int(attr.targets[0, 0]), view.shape))

        @contextlib.contextmanager
        def stage(self, name, total, unit):
            done = []
            yield done.append
            events.append(("stage", name, total, unit, done[-1] if done else 0))

    model = cnnscan.load_model(SmallConvNet())
    x = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    result = run_scan(
        model,
        x,
        methods=["gradient", "gradcam"],
        top_k=2,
        class_image_steps=3,
        observer=Recorder(),
    )
    assert events[0] == ("predictions", [p["class_id"] for p in result.predictions])
    assert events[1][:3] == ("first_map", "gradcam", result.predictions[0]["class_id"])
    stages = {e[1]: e[2:] for e in events if e[0] == "stage"}
    assert stages["methods"] == (2, "method", 2)
    assert stages["class image"] == (3, "step", 3)
    assert stages["leaderboard"][1] == "forward" and stages["leaderboard"][2] > 0
    assert list(result.attributions) == ["gradient", "gradcam"]  # the report keeps its order


def test_a_scan_samples_lightly_unless_full_and_says_how_many(monkeypatch):
    """The default scan runs the sampling methods at `QUICK_OPTIONS`, a full scan at the
    library's defaults, and the report's cell says the count."""
    from cnnscan.report import QUICK_OPTIONS
    from cnnscan.report_pictures import map_notes

    model = cnnscan.load_model(SmallConvNet())
    x = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    quick = run_scan(
        model,
        x,
        methods=["integrated_gradients", "smoothgrad"],
        top_k=2,
        class_image_steps=0,
        evaluate="none",
    )
    assert (
        quick.attributions["integrated_gradients"].extras["n_steps"]
        == QUICK_OPTIONS["integrated_gradients"]["n_steps"]
    )
    assert (
        quick.attributions["smoothgrad"].extras["n_samples"]
        == QUICK_OPTIONS["smoothgrad"]["n_samples"]
    )
    notes = [n["text"] for n in map_notes(quick.attributions["smoothgrad"], 0)]
    assert f"{QUICK_OPTIONS['smoothgrad']['n_samples']} samples" in notes
    full = run_scan(model, x, methods=["smoothgrad"], top_k=1, class_image_steps=0, evaluate="full")
    assert full.attributions["smoothgrad"].extras["n_samples"] == 25


def test_the_report_shows_the_concepts_of_the_top1_class(top5_report):
    html, out, result = top5_report
    found = result.concepts
    assert found is not None and found[0].class_id == result.predictions[0]["class_id"]
    assert 'id="concepts"' in html and 'href="#concepts"' in html
    tables = [t for t in parse(html).tables if t["class"] == "concepts"]
    assert len(tables) == 1
    rows = tables[0]["rows"][1:]
    assert [int(row[1]["text"]) for row in rows] == [c.channel for c in found[0].concepts]
    assert len(rows) == 6 and all(len(row[3]["images"]) == 1 for row in rows)
    saved = json.loads((out / "concepts.json").read_text())
    assert [c["channel"] for c in saved["targets"][0]["concepts"]] == [
        c.channel for c in found[0].concepts
    ]
    assert "Faithfulness check" in html
