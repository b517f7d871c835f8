"""The HTML report: parses, top-k table equal to predictions.json, one image per (class,
method) cell showing that class's map, labels escaped, everything embedded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import DOMESTIC_CATS, SmallConvNet, Tables, decode, parse
from PIL import Image

import cnnscan
from cnnscan.report import run_scan, write_report


def prediction_table(tables: Tables) -> list[list[str]]:
    for table in tables.tables:
        header = [cell["text"].strip() for cell in table["rows"][0]]
        if header[:4] == ["rank", "class id", "label", "probability"]:
            return [[cell["text"].strip() for cell in row] for row in table["rows"][1:]]
    raise AssertionError("no predictions table")


def grid_table(tables: Tables) -> dict:
    grids = [table for table in tables.tables if "grid" in table["class"]]
    assert grids, "no explanation grid"
    return grids[0]


@pytest.fixture(scope="module")
def top5_report(tmp_path_factory, default_model):
    out = tmp_path_factory.mktemp("report")
    result = run_scan(
        default_model,
        "sample:chelsea",
        methods=["gradient", "gradient_x_input"],
        top_k=5,
        image_name="chelsea",
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


def test_one_image_per_class_and_method(top5_report):
    html, out, result = top5_report
    predictions = json.loads((out / "predictions.json").read_text())
    methods = list(result.attributions)
    grid = grid_table(parse(html))
    header = [cell["text"] for cell in grid["rows"][0]]
    for method in methods:
        assert any(method in text for text in header), method
    body = grid["rows"][1:]
    assert len(body) == len(predictions)
    for row, p in zip(body, predictions, strict=True):
        label_cell, *cells = row
        assert str(p["class_id"]) in label_cell["text"] and p["label"] in label_cell["text"]
        assert len(cells) == len(methods)
        for cell, method in zip(cells, methods, strict=True):
            assert len(cell["images"]) == 1
            image = cell["images"][0]
            assert method in image["alt"] and p["label"] in image["alt"]
            # The cell shows this class's map of this method: the PNG saved beside the report.
            (saved,) = out.rglob(f"{method}_img0_class{p['class_id']}.png")
            with Image.open(saved) as picture:
                np.testing.assert_array_equal(decode(image["src"]), np.asarray(picture))


def test_cells_differ_between_classes(top5_report):
    html, _, _ = top5_report
    grid = grid_table(parse(html))
    first_column = [decode(row[1]["images"][0]["src"]) for row in grid["rows"][1:]]
    assert any(not np.array_equal(first_column[0], other) for other in first_column[1:])


def test_everything_is_embedded(top5_report):
    html, _, _ = top5_report
    tables = parse(html)
    assert tables.images
    for image in tables.images:
        assert image["src"].startswith("data:image/png;base64,")
        decode(image["src"])  # a valid PNG
    assert "<script src" not in html and "<link" not in html


def test_input_picture_is_what_the_model_sees(top5_report, default_model, chelsea):
    html, _, _ = top5_report
    tables = parse(html)
    first = decode(tables.images[0]["src"])
    np.testing.assert_array_equal(first, np.asarray(default_model.view(chelsea)))


def test_labels_are_escaped(tmp_path):
    labels = ["<script>alert(1)</script>", "cat & dog", 'say "hi"']
    model = cnnscan.load_model(SmallConvNet(classes=3), labels=labels)
    result = run_scan(model, "sample:coffee", methods=["gradient"], top_k=3)
    html = write_report(result, tmp_path).read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;" in html
    rows = prediction_table(parse(html))
    assert sorted(row[2] for row in rows) == sorted(labels)


def test_quick_cli_report_has_a_cell_per_class_and_method(quick_report):
    code, out, _, stderr = quick_report
    assert code == 0, stderr
    html = (out / "report.html").read_text(encoding="utf-8")
    grid = grid_table(parse(html))
    assert len(grid["rows"]) == 1 + 2
    assert all(len(row) == 1 + 2 for row in grid["rows"][1:])
    assert len(prediction_table(parse(html))) == 2
