"""Batch mode: inputs, tables and arrays checked against single-image `explain`/`predict`,
the errors table, resume after an injected crash (exception and SIGKILL), and the Ray
engine's output against the in-process engine's."""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SmallConvNet
from PIL import Image

import cnnscan
import cnnscan.batch
from cnnscan.batch.inputs import discover
from cnnscan.batch.runner import plan
from cnnscan.batch.store import Store
from cnnscan.cli import main
from cnnscan.errors import BatchError
from cnnscan.models.preprocessing import Preprocessing

TESTS = Path(__file__).parent
GOOD = [
    "chelsea.jpg",
    "coffee.png",
    "nested/deeper/astronaut.webp",
    "nested/gray.png",
    "nested/rgba.png",
    "palette.gif",
    "noise_a.jpg",
    "noise_b.bmp",
    "noise_c.tiff",
]
BROKEN = {
    "empty.jpg": "empty (0 bytes)",
    "truncated.jpg": "truncated",
    "text.png": "not an image",
}


def make_folder(root: Path) -> Path:
    """Sample photos, generated pictures of odd modes and sizes, and broken files."""
    from skimage import data

    rng = np.random.default_rng(0)
    for name in ("nested/deeper", "nested"):
        (root / name).mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.chelsea()).save(root / "chelsea.jpg", quality=90)
    Image.fromarray(data.coffee()).save(root / "coffee.png")
    Image.fromarray(data.astronaut()[::4, ::4]).save(root / "nested/deeper/astronaut.webp")
    Image.fromarray(rng.integers(0, 255, (40, 60), dtype=np.uint8)).save(root / "nested/gray.png")
    rgba = rng.integers(0, 255, (50, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "nested/rgba.png")
    Image.fromarray(rng.integers(0, 255, (33, 47, 3), dtype=np.uint8)).convert("P").save(
        root / "palette.gif"
    )
    for name, size in (
        ("noise_a.jpg", (64, 80)),
        ("noise_b.bmp", (20, 20)),
        ("noise_c.tiff", (90, 45)),
    ):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name)
    (root / "empty.jpg").write_bytes(b"")
    whole = (root / "chelsea.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (root / "text.png").write_text("this is text, not a PNG")
    (root / "notes.txt").write_text("not an image extension: ignored")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def tiny() -> cnnscan.Model:
    """A small conv net at 32×32 input: fast enough to run every test many times."""
    module = SmallConvNet(classes=5)
    return cnnscan.load_model(
        module, preprocessing=Preprocessing(size=(32, 32), resize_shorter=None)
    )


def run(source, out, model, **kwargs) -> cnnscan.batch.Results:
    kwargs.setdefault("progress", False)
    kwargs.setdefault("methods", ["gradcam", "gradient"])
    return cnnscan.batch.run(source, out=out, model=model, **kwargs)


def rows_by_key(results) -> dict[tuple, dict]:
    rows = results.rows().to_pylist()
    keyed = {(r["image_id"], r["method"], r["target_rank"]): r for r in rows}
    assert len(keyed) == len(rows), "duplicate rows"
    return keyed


def same_results(a, b, exact: bool = True) -> None:
    """Same rows (same keys and values) and the same maps; `exact=False` allows float rounding."""
    rows_a, rows_b = rows_by_key(a), rows_by_key(b)
    assert rows_a.keys() == rows_b.keys()
    for key, row in rows_a.items():
        other = rows_b[key]
        for column in ("path", "layer", "target", "target_name", "label"):
            assert row[column] == other[column], (key, column)
        for column in ("probability", "score"):
            assert row[column] == pytest.approx(other[column], rel=0 if exact else 1e-5), key
        map_a, map_b = a.array(row), b.array(other)
        if exact:
            np.testing.assert_array_equal(map_a, map_b)
        else:
            np.testing.assert_allclose(map_a, map_b, rtol=1e-4, atol=1e-6)
    key = ["image_id", "rank"]
    pred_a = sorted(a.predictions().to_pylist(), key=lambda r: [r[k] for k in key])
    pred_b = sorted(b.predictions().to_pylist(), key=lambda r: [r[k] for k in key])
    assert [(r["image_id"], r["rank"], r["class_id"]) for r in pred_a] == [
        (r["image_id"], r["rank"], r["class_id"]) for r in pred_b
    ]
    assert sorted(a.errors().to_pylist(), key=str) == sorted(b.errors().to_pylist(), key=str)


# -- inputs ------------------------------------------------------------------------------
def test_folder_is_searched_recursively_for_images_only(folder):
    items = discover(folder)
    assert [item.image_id for item in items] == sorted([*GOOD, *BROKEN])
    assert all(Path(item.path).is_file() for item in items)


def test_relative_inputs_become_absolute_paths(folder, monkeypatch):
    monkeypatch.chdir(folder)
    with pytest.raises(BatchError, match="no images found"):
        discover("nested/*.webp")  # a glob recurses only with **
    items = discover("nested/**/*.webp")
    assert [(i.image_id, i.path) for i in items] == [
        ("nested/deeper/astronaut.webp", str(folder / "nested/deeper/astronaut.webp"))
    ]


def test_glob_and_list_inputs(folder):
    jpgs = discover(str(folder / "**" / "*.jpg"))
    assert sorted(Path(i.path).name for i in jpgs) == [
        "chelsea.jpg",
        "empty.jpg",
        "noise_a.jpg",
        "truncated.jpg",
    ]
    listed = discover([folder / "coffee.png", folder / "chelsea.jpg"])
    assert [Path(i.path).name for i in listed] == ["coffee.png", "chelsea.jpg"]


def test_bad_listings_raise_with_the_fix(tmp_path, folder):
    with pytest.raises(BatchError, match="does not exist"):
        discover(tmp_path / "nowhere")
    with pytest.raises(BatchError, match="no images found"):
        discover(tmp_path)
    (tmp_path / "t.csv").write_text("file\nchelsea.jpg\n")
    with pytest.raises(BatchError, match=r"no column .path.*path_column"):
        discover(tmp_path / "t.csv")
    (tmp_path / "d.csv").write_text(f"path\n{folder}/chelsea.jpg\n{folder}/chelsea.jpg\n")
    with pytest.raises(BatchError, match="appears twice"):
        discover(tmp_path / "d.csv")
    (tmp_path / "b.csv").write_text("path,x0,y0\nchelsea.jpg,1,2\n")
    with pytest.raises(BatchError, match="x0, y0, x1, y1"):
        discover(tmp_path / "b.csv")


# -- tables and arrays against single-image explain / predict -----------------------------
@pytest.fixture(scope="module")
def tiny_run(folder, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-run")
    return run(folder, out, tiny, targets="top2", part_size=4, batch_size=3)


def test_rows_match_single_image_explain(tiny_run, tiny, folder):
    rows = tiny_run.rows().to_pylist()
    assert len(rows) == len(GOOD) * 2 * 2  # images × methods × targets
    for row in rows:
        attr = cnnscan.explain(tiny, row["path"], row["method"], targets=[row["target"]])
        np.testing.assert_allclose(
            tiny_run.array(row), attr.maps[0, 0].detach().numpy(), rtol=1e-4, atol=1e-6
        )
        assert row["score"] == pytest.approx(float(attr.scores[0, 0]), rel=1e-5)
        assert row["layer"] == attr.layer
        assert row["array_file"].startswith("arrays/part-")
    predictions = tiny_run.predictions().to_pylist()
    assert len(predictions) == len(GOOD) * tiny.num_classes  # top_k=5 of 5 classes
    for image_id in GOOD:
        mine = [p for p in predictions if p["image_id"] == image_id]
        reference = cnnscan.predict(tiny, folder / image_id, k=5)[0]
        assert [p["class_id"] for p in mine] == [r["class_id"] for r in reference]
        assert [p["probability"] for p in mine] == pytest.approx(
            [r["probability"] for r in reference], rel=1e-5
        )
        ranked = [r for r in rows if r["image_id"] == image_id and r["method"] == "gradcam"]
        assert [r["target"] for r in ranked] == [r["class_id"] for r in reference[:2]]


@pytest.mark.parametrize("workers", [1, 3])
def test_any_number_of_workers_gives_the_same_output(tiny_run, folder, tiny, tmp_path, workers):
    threads = torch.get_num_threads()
    other = run(folder, tmp_path, tiny, targets="top2", part_size=4, batch_size=3, workers=workers)
    same_results(other, tiny_run)
    assert torch.get_num_threads() == threads  # shared among the workers during the run only


def test_errors_table_names_each_broken_file(tiny_run):
    errors = {row["image_id"]: row for row in tiny_run.errors().to_pylist()}
    assert errors.keys() == BROKEN.keys()
    for name, reason in BROKEN.items():
        assert errors[name]["stage"] == "read"
        assert reason in errors[name]["reason"]


def test_summary_counts(tiny_run):
    summary = tiny_run.summary()
    assert summary["images"] == len(GOOD) + len(BROKEN)
    assert summary["explained"] == len(GOOD)
    assert summary["errors"] == len(BROKEN)
    assert summary["rows"] == len(GOOD) * 4
    top1 = [p["class_id"] for p in tiny_run.predictions().to_pylist() if p["rank"] == 1]
    counts = {c["class_id"]: c["predicted"] for c in summary["classes"]}
    assert counts == {c: top1.count(c) for c in set(top1)}
    html = (tiny_run.out / "summary.html").read_text()
    assert "text.png" in html and "gradcam" in html


def test_input_resolution_and_float16(folder, tiny, tmp_path):
    results = run(
        [folder / "chelsea.jpg", folder / "coffee.png"],
        tmp_path,
        tiny,
        methods=["gradcam"],
        resolution="input",
        dtype="float16",
        options={"gradcam": {}},
    )
    for row in results.rows().to_pylist():
        stored = results.array(row)
        assert stored.dtype == np.float16 and stored.shape == (1, 32, 32)
        attr = cnnscan.explain(tiny, row["path"], "gradcam", targets=[row["target"]])
        expected = attr.upsample()[0, 0].numpy()
        np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=1e-3 * np.abs(expected).max())


def test_table_input_with_labels_ids_and_boxes(folder, tiny, tmp_path):
    table = tmp_path / "images.csv"
    table.write_text(
        "path,label,x0,y0,x1,y1\n"
        f"{folder}/chelsea.jpg,3,10,20,200,250\n"
        f"{folder}/coffee.png,class 1,,,,\n"
        f"{folder}/noise_a.jpg,,0,0,5,5\n"
        f"{folder}/noise_b.bmp,7,,,,\n"  # out of range for 5 classes
        "nested/gray.png,nonsense,,,,\n"  # relative to the table; unknown class name
        f"{folder}/noise_c.tiff,2,5,5,1,1\n"  # empty box
    )
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "gray.png").write_bytes((folder / "nested" / "gray.png").read_bytes())
    items = cnnscan.batch.discover(table)
    assert items[0].box == (10.0, 20.0, 200.0, 250.0) and items[1].box is None
    assert items[4].path == str(tmp_path / "nested" / "gray.png")
    results = run(table, tmp_path / "out", tiny, targets="label", methods=["gradcam"])
    rows = {r["image_id"]: r for r in results.rows().to_pylist()}
    assert {k: (r["target"], r["label"]) for k, r in rows.items()} == {
        f"{folder}/chelsea.jpg": (3, 3),
        f"{folder}/coffee.png": (1, 1),
    }
    errors = {r["image_id"]: r["reason"] for r in results.errors().to_pylist()}
    assert "no label" in errors[f"{folder}/noise_a.jpg"]
    assert (
        "out of range" in errors[f"{folder}/noise_b.bmp"]
        or "not one of" in errors[f"{folder}/noise_b.bmp"]
    )
    assert "unknown class name 'nonsense'" in errors["nested/gray.png"]
    assert "empty" in errors[f"{folder}/noise_c.tiff"]
    summary = results.summary()
    predicted = {
        p["image_id"]: p["class_id"] for p in results.predictions().to_pylist() if p["rank"] == 1
    }
    right = sum(predicted[k] == r["label"] for k, r in rows.items())
    assert summary["top1_accuracy"] == pytest.approx(right / 2)


def test_parquet_table_with_id_column(folder, tiny, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"file": ["chelsea.jpg", "coffee.png"], "id": ["cat", "cup"]}),
        folder / "listing.parquet",
    )
    try:
        results = run(folder / "listing.parquet", tmp_path, tiny, path_column="file")
    finally:
        (folder / "listing.parquet").unlink()
    assert sorted({r["image_id"] for r in results.rows().to_pylist()}) == ["cat", "cup"]


def test_a_list_of_layers_for_layercam_fusion(folder, tiny, tmp_path):
    layers = ["conv2", "conv3"]
    results = run(
        [folder / "chelsea.jpg", folder / "coffee.png"],
        tmp_path,
        tiny,
        methods=["layercam"],
        layer=layers,
    )
    for row in results.rows().to_pylist():
        attr = cnnscan.explain(tiny, row["path"], "layercam", targets=[row["target"]], layer=layers)
        assert row["layer"] == "conv2,conv3"
        np.testing.assert_allclose(
            results.array(row), attr.maps[0, 0].numpy(), rtol=1e-4, atol=1e-6
        )


def test_fixed_targets_by_id_and_name(folder, tiny, tmp_path):
    results = run([folder / "chelsea.jpg"], tmp_path, tiny, targets=[4, "class 0"])
    assert [r["target"] for r in results.rows().to_pylist() if r["method"] == "gradcam"] == [4, 0]


def test_bad_settings_fail_before_any_work(folder, tiny, tmp_path):
    with pytest.raises(cnnscan.MethodError, match="unknown method"):
        run(folder, tmp_path, tiny, methods=["gradcan"])
    with pytest.raises(cnnscan.MethodError, match="no option"):
        run(folder, tmp_path, tiny, options={"gradcam": {"steps": 3}})
    with pytest.raises(cnnscan.LayerError, match="no layer named"):
        run(folder, tmp_path, tiny, layer="conv9")
    with pytest.raises(BatchError, match="resolution"):
        run(folder, tmp_path, tiny, resolution="pixels")
    with pytest.raises(cnnscan.TargetError):
        run(folder, tmp_path, tiny, targets=[17])
    for bad in ({"batch_size": 0}, {"workers": 0}, {"engine": "spark"}):
        with pytest.raises(BatchError, match=next(iter(bad))):
            run(folder, tmp_path, tiny, **bad)
    for top_k in (0, 6):  # the tiny model has 5 classes
        with pytest.raises(cnnscan.TargetError, match="top_k must be a whole number from 1 to 5"):
            run(folder, tmp_path, tiny, top_k=top_k)
    with pytest.raises(BatchError, match="no methods"):
        run(folder, tmp_path, tiny, methods=[])
    assert not (tmp_path / "rows").exists()


class NanOnBright(torch.nn.Module):
    """SmallConvNet whose logits are NaN for a bright image (mean input above 1.5)."""

    def __init__(self):
        super().__init__()
        self.net = SmallConvNet(classes=5)

    def forward(self, x):
        logits = self.net(x)
        bright = x.mean(dim=(1, 2, 3)) > 1.5
        return torch.where(bright[:, None], torch.full_like(logits, float("nan")), logits)


def test_an_image_that_fails_alone_is_an_error_row(folder, tmp_path):
    white = tmp_path / "white.png"
    Image.new("RGB", (40, 40), "white").save(white)
    model = cnnscan.load_model(
        NanOnBright(), preprocessing=Preprocessing(size=(32, 32), resize_shorter=None)
    )
    images = [folder / "chelsea.jpg", white, folder / "coffee.png"]
    results = run(images, tmp_path / "out", model, batch_size=3)
    assert sorted({r["image_id"] for r in results.rows().to_pylist()}) == sorted(
        [str(folder / "chelsea.jpg"), str(folder / "coffee.png")]
    )
    (error,) = results.errors().to_pylist()
    assert error["image_id"] == str(white) and error["stage"] == "explain"
    assert "NaN" in error["reason"]


def test_settings_that_fail_on_the_first_batch_stop_the_run_and_can_be_fixed(
    folder, tiny, tmp_path
):
    with pytest.raises(cnnscan.LayerError, match="spatial"):
        run(folder, tmp_path, tiny, methods=["gradcam"], layer="fc")
    results = run(folder, tmp_path, tiny, methods=["gradcam"])  # same folder, fixed settings
    assert len(results.rows().to_pylist()) == len(GOOD)


def test_model_is_left_as_it_was(folder, tmp_path):
    module = SmallConvNet(classes=5).train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    model = cnnscan.load_model(
        module, preprocessing=Preprocessing(size=(32, 32), resize_shorter=None)
    )
    run(folder, tmp_path, model, methods=["gradcam", "guided_backprop"])
    assert module.training
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert all(p.requires_grad for p in module.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in module.modules())


# -- metrics, by cnnscan's evaluation API -------------------------------------------------------
def test_metric_columns_match_evaluating_each_image_alone(folder, tiny, tmp_path):
    pytest.importorskip("cnnscan.metrics")
    table = tmp_path / "boxes.csv"
    table.write_text(
        "path,x0,y0,x1,y1\n"
        f"{folder}/chelsea.jpg,100,50,300,250\n"
        f"{folder}/coffee.png,,,,\n"
        f"{folder}/noise_a.jpg,0,0,40,32\n"
        f"{folder}/nested/gray.png,30,0,60,40\n"
    )
    results = run(
        table,
        tmp_path / "out",
        tiny,
        methods=["gradcam", "gradient"],
        metrics=["deletion", "insertion", "pointing_game"],
        batch_size=4,
    )
    rows = results.rows().to_pylist()
    assert len(rows) == 8
    boxes = {item.image_id: item.box for item in cnnscan.batch.discover(table)}
    for row in rows:
        attr = cnnscan.explain(tiny, row["path"], row["method"], targets=[row["target"]])
        box = boxes[row["image_id"]]
        reference = cnnscan.evaluate(
            tiny,
            row["path"],
            attr,
            ["deletion_auc", "insertion_auc", *(["pointing_game"] if box else [])],
            box=box,
        )
        assert row["deletion_auc"] == pytest.approx(reference["deletion_auc"], abs=1e-4)
        assert row["insertion_auc"] == pytest.approx(reference["insertion_auc"], abs=1e-4)
        if box is None:
            assert row["pointing_game"] is None
        else:
            assert row["pointing_game"] == pytest.approx(reference["pointing_game"])
    summary = results.summary()
    for method in ("gradcam", "gradient"):
        mine = [r for r in rows if r["method"] == method]
        numbers = summary["methods"][method]
        assert numbers["mean_deletion_auc"] == pytest.approx(
            np.mean([r["deletion_auc"] for r in mine])
        )
        hits = [r["pointing_game"] for r in mine if r["pointing_game"] is not None]
        assert numbers["mean_pointing_game"] == pytest.approx(np.mean(hits))
        assert numbers["count_pointing_game"] == 3


def test_unknown_metrics_are_refused_before_any_work(folder, tiny, tmp_path):
    pytest.importorskip("cnnscan.metrics")
    with pytest.raises(BatchError, match="unknown metric 'delet'"):
        run(folder, tmp_path, tiny, metrics=["delet"])
    with pytest.raises(BatchError, match="cnnscan evaluate"):
        run(folder, tmp_path, tiny, metrics=["model_randomization"])


# -- resume ------------------------------------------------------------------------------
def test_resume_after_an_interruption_matches_an_uninterrupted_run(
    folder, tiny, tmp_path, monkeypatch
):
    options = {"targets": "top2", "part_size": 2, "batch_size": 2}
    reference = run(folder, tmp_path / "whole", tiny, **options)
    calls = {"n": 0}
    compute = cnnscan.batch.Explainer._compute

    def interrupted(self, batch, part):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        return compute(self, batch, part)

    monkeypatch.setattr(cnnscan.batch.Explainer, "_compute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(folder, tmp_path / "resumed", tiny, **options)
    monkeypatch.setattr(cnnscan.batch.Explainer, "_compute", compute)
    store = Store(tmp_path / "resumed")
    done = [entry["images"] for _, entry in store.manifest()]
    assert 0 < len(done) < 7  # some parts were committed, not all
    partial = cnnscan.batch.load(tmp_path / "resumed")
    assert len(partial.rows().to_pylist()) < len(reference.rows().to_pylist())
    resumed = run(folder, tmp_path / "resumed", tiny, **options)
    same_results(resumed, reference)
    manifest = [entry["images"] for _, entry in Store(tmp_path / "resumed").manifest()]
    flat = [image for images in manifest for image in images]
    assert sorted(flat) == sorted([*GOOD, *BROKEN])  # every image exactly once


def test_rerunning_a_finished_run_does_nothing(folder, tiny, tmp_path, monkeypatch):
    first = run(folder, tmp_path, tiny)

    def fail(*args, **kwargs):
        raise AssertionError("a finished image was computed again")

    monkeypatch.setattr(cnnscan.batch.Explainer, "_compute", fail)
    again = run(folder, tmp_path, tiny)
    same_results(again, first)


def test_uncommitted_files_of_a_killed_run_are_removed(folder, tiny, tmp_path):
    run([folder / "chelsea.jpg"], tmp_path, tiny)
    for table in ("rows", "predictions", "errors"):
        (tmp_path / table / "part-000007.parquet").write_bytes(b"written, never committed")
    (tmp_path / "arrays" / "part-000007.npz").write_bytes(b"half an archive")
    (tmp_path / ".tmp").mkdir(exist_ok=True)
    (tmp_path / ".tmp" / "part-000008.npz").write_bytes(b"temporary")
    results = run([folder / "chelsea.jpg", folder / "coffee.png"], tmp_path, tiny)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("part-*"))
    assert "rows/part-000007.parquet" not in files and "arrays/part-000007.npz" not in files
    assert not (tmp_path / ".tmp").exists()
    assert sorted({r["image_id"] for r in results.rows().to_pylist()}) == [
        str(folder / "chelsea.jpg"),
        str(folder / "coffee.png"),
    ]


def test_a_resumed_run_must_use_the_same_settings(folder, tiny, tmp_path):
    run([folder / "chelsea.jpg"], tmp_path, tiny)
    with pytest.raises(BatchError, match=r"other settings.*methods"):
        run([folder / "chelsea.jpg"], tmp_path, tiny, methods=["gradcam"])


def test_one_run_per_folder_at_a_time(tmp_path):
    first = Store(tmp_path)
    first.open({"methods": ["gradcam"]})
    try:
        with pytest.raises(BatchError, match="in use by another batch run"):
            Store(tmp_path).open({"methods": ["gradcam"]})
    finally:
        first.close()
    Store(tmp_path).open({"methods": ["gradcam"]})


def test_plan_keeps_parts_stable_and_renumbers_changed_ones(tmp_path):
    items = [cnnscan.batch.Item(f"{i}.png", f"{i}.png") for i in range(7)]
    store = Store(tmp_path)
    store.open({})
    assert [(n, [i.image_id for i in part]) for n, part in plan(items, set(), 3, store)] == [
        (0, ["0.png", "1.png", "2.png"]),
        (1, ["3.png", "4.png", "5.png"]),
        (2, ["6.png"]),
    ]
    store.committed, store.next_number = {0}, 1
    parts = plan(items, {"0.png", "1.png", "2.png", "4.png"}, 3, store)
    assert [(n, [i.image_id for i in part]) for n, part in parts] == [
        (3, ["3.png", "5.png"]),  # partly done: a new number
        (2, ["6.png"]),
    ]
    store.close()


@pytest.mark.slow
def test_resume_after_sigkill(folder, tmp_path):
    """Kill -9 a run halfway (while a part is being committed), resume it, compare with an
    uninterrupted run: the same rows, none twice."""
    script = textwrap.dedent(
        f"""
        import sys, time, pathlib
        sys.path.insert(0, {str(TESTS)!r})
        import cnnscan, cnnscan.batch
        from cnnscan.models.preprocessing import Preprocessing
        from helpers import SmallConvNet
        model = cnnscan.load_model(
            SmallConvNet(classes=5), preprocessing=Preprocessing(size=(32, 32), resize_shorter=None)
        )
        flag = pathlib.Path(sys.argv[2])
        committed = []

        def on_part(part):
            committed.append(part.number)
            if len(committed) == 3:
                flag.write_text("halfway")
                time.sleep(600)

        cnnscan.batch.run({str(folder)!r}, ["gradcam", "gradient"], sys.argv[1], model=model,
                          targets="top2", part_size=2, batch_size=2, progress=False,
                          on_part=on_part)
        """
    )
    out, flag = tmp_path / "killed", tmp_path / "flag"
    process = subprocess.Popen([sys.executable, "-c", script, str(out), str(flag)])
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert process.poll() is None, "the run ended before it was killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    committed = [number for number, _ in Store(out).manifest()]
    assert len(committed) == 3  # of 6 parts
    for table in ("rows", "predictions", "errors", "arrays"):
        numbers = {int(p.name[5:11]) for p in (out / table).glob("part-*")}
        assert numbers <= set(committed), f"{table}: files of uncommitted parts"
    model = cnnscan.load_model(
        SmallConvNet(classes=5), preprocessing=Preprocessing(size=(32, 32), resize_shorter=None)
    )
    options = {"targets": "top2", "part_size": 2, "batch_size": 2}
    resumed = run(folder, out, model, **options)
    reference = run(folder, tmp_path / "whole", model, **options)
    same_results(resumed, reference)


# -- engines and the command line -------------------------------------------------------------
@pytest.mark.slow
def test_ray_engine_gives_the_same_output_as_in_process(folder, default_model, tmp_path):
    pytest.importorskip("ray.data")
    images = [folder / name for name in GOOD[:5]] + [folder / "text.png"]
    options = {"methods": ["gradcam", "gradient"], "part_size": 2, "batch_size": 2}
    local = run(images, tmp_path / "local", default_model, **options)
    distributed = run(images, tmp_path / "ray", default_model, engine="ray", workers=2, **options)
    same_results(distributed, local)
    assert json.loads((tmp_path / "ray" / "summary.json").read_text())["rows"] == 10


def test_ray_worker_returns_cnnscan_errors_as_data(folder, tiny):
    """Bad settings found by a worker reach the driver as the error itself (one line in the
    CLI), not wrapped in Ray's task error."""
    from cnnscan.batch.ray_engine import _Worker

    worker = _Worker(tiny, cnnscan.batch.Settings(methods=("gradcam",), layer="fc"))
    listing = json.dumps([cnnscan.batch.Item(str(folder / "chelsea.jpg"), "cat").to_dict()])
    out = worker({"number": np.array([3]), "items": np.array([listing], dtype=object)})
    error = pickle.loads(out["result"][0])
    assert isinstance(error, cnnscan.LayerError) and "spatial" in str(error)
    good = _Worker(tiny, cnnscan.batch.Settings(methods=("gradcam",)))
    part = pickle.loads(good({"number": np.array([3]), "items": np.array([listing])})["result"][0])
    assert part.number == 3 and part.rows["image_id"] == ["cat"]


def test_cli_batch(folder, tmp_path, capsys):
    code = main(
        [
            "batch",
            str(folder / "*.jpg"),
            "--methods",
            "gradcam",
            "--out",
            str(tmp_path),
            "--targets",
            "285",
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "4 images: 2 explained, 2 errors; 2 rows" in captured.out
    rows = cnnscan.batch.load(tmp_path).rows().to_pylist()
    assert {r["target"] for r in rows} == {285}
    assert {r["target_name"] for r in rows} == {"Egyptian cat"}
    code = main(
        [
            "batch",
            str(folder),
            "--methods",
            "gradcam",
            "--out",
            str(tmp_path),
            "--quiet",
            "--option",
            "n_steps=4",
            "--methods",
            "gradcam,gradient",
        ]
    )
    assert code == 1
    assert "METHOD.KEY=VALUE" in capsys.readouterr().err
