"""The `cnnscan` command: outputs of scan/explain/layers/methods, one-line errors, help."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DOMESTIC_CATS, png_pixels
from PIL import Image

import cnnscan
from cnnscan.cli import main
from cnnscan.display import map_picture

QUICK_METHODS = ("gradient", "guided_backprop")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class Links(HTMLParser):
    """Every URL-bearing attribute of a page, and whether scripts or styles load from outside."""

    def __init__(self):
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "data") and value is not None:
                self.urls.append((tag, name, value))


def assert_self_contained(html: str) -> None:
    links = Links()
    links.feed(html)
    images = [u for u in links.urls if u[0] == "img"]
    assert images, "the report has no images"
    for tag, name, value in links.urls:
        if name == "href" and value.startswith("#"):
            continue
        assert value.startswith("data:"), f"<{tag} {name}={value[:60]!r}> is not embedded"
    assert "http://" not in html.split("<body", 1)[0]
    lowered = html.lower()
    assert "@import" not in lowered
    assert "url(http" not in lowered.replace(" ", "")


def reference_maps(model, method: str, class_ids: list[int], **options) -> np.ndarray:
    attr = cnnscan.explain(model, "sample:chelsea", method, targets=class_ids, **options)
    return attr.maps[0].detach().numpy()


# -- scan ------------------------------------------------------------------------------------
def test_scan_exit_code_and_summary(quick_report, cat_top1):
    code, out, stdout, stderr = quick_report
    assert code == 0, stderr
    assert f"1. {cat_top1[0]:4d} {cat_top1[1]}" in stdout
    assert "preprocessing: centre crop 87.5 % of the shorter side, bicubic" in stdout
    assert str((out / "report.html").resolve()) in stdout
    assert "Traceback" not in stderr


def test_scan_predictions_json(quick_report, default_model, chelsea):
    _, out, _, _ = quick_report
    predictions = json.loads((out / "predictions.json").read_text())
    assert isinstance(predictions, list) and len(predictions) == 2
    for p in predictions:
        assert {"rank", "class_id", "label", "probability"} <= set(p)
    assert [p["rank"] for p in predictions] == [1, 2]
    assert predictions[0]["class_id"] in DOMESTIC_CATS
    # Probabilities and labels from an independent forward of the model.
    with torch.no_grad():
        probabilities = default_model.module(default_model.preprocess(chelsea)).softmax(1)[0]
    top = probabilities.topk(2)
    assert [p["class_id"] for p in predictions] == top.indices.tolist()
    for p, expected in zip(predictions, top.values.tolist(), strict=True):
        assert p["probability"] == pytest.approx(expected, abs=1e-5)
        assert p["label"] == cnnscan.models.labels.imagenet_labels()[p["class_id"]]


def test_scan_report_is_self_contained(quick_report):
    _, out, _, _ = quick_report
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert_self_contained(html)


def test_scan_writes_the_raw_maps_of_the_top1_class(quick_report, default_model):
    _, out, _, _ = quick_report
    class_ids = [p["class_id"] for p in json.loads((out / "predictions.json").read_text())]
    with np.load(out / "maps.npz") as maps:
        assert sorted(maps.files) == sorted(f"{m}_class{class_ids[0]}" for m in QUICK_METHODS)
        for method in QUICK_METHODS:
            expected = reference_maps(default_model, method, class_ids[:1])[0]
            raw = maps[f"{method}_class{class_ids[0]}"]
            assert raw.shape == expected.shape == (3, 224, 224)
            np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-7)
    assert not (out / "maps").exists()  # per-map PNG and NPY files only with --all-maps


def test_scan_all_maps_writes_png_and_raw_npy_per_method_and_target(tmp_path, capsys):
    from helpers import SmallConvNet

    net = SmallConvNet(classes=3)
    torch.save(net, tmp_path / "full.pt")
    args = ["sample:coffee", "--model", str(tmp_path / "full.pt"), "--trust-pickle"]
    args += ["--methods", "gradient,gradcam", "--top-k", "2", "--class-image-steps", "0"]
    args += ["--no-leaderboard", "--all-maps", "--out", str(tmp_path / "r")]
    code, _, err = run(capsys, "scan", *args)
    assert code == 0, err
    out = tmp_path / "r"
    class_ids = [p["class_id"] for p in json.loads((out / "predictions.json").read_text())]
    with np.load(out / "maps.npz") as maps:
        for method in ("gradient", "gradcam"):
            for class_id in class_ids:
                raw = np.load(out / "maps" / method / f"{method}_img0_class{class_id}.npy")
                with Image.open(out / "maps" / method / f"{method}_img0_class{class_id}.png") as p:
                    assert p.mode == "RGB" and np.asarray(p).std() > 0  # not a blank picture
            np.testing.assert_array_equal(
                maps[f"{method}_class{class_ids[0]}"],
                np.load(out / "maps" / method / f"{method}_img0_class{class_ids[0]}.npy"),
            )
    assert raw.shape[0] == 1  # gradcam: a layer map


def test_scan_on_a_file_and_another_model(tmp_path, capsys):
    picture = tmp_path / "cat.png"
    cnnscan.sample_image("chelsea").save(picture)
    code, _, err = run(
        capsys,
        "scan",
        str(picture),
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--methods",
        "gradient",
        "--top-k",
        "3",
        "--out",
        str(tmp_path / "r"),
    )
    assert code == 0, err
    predictions = json.loads((tmp_path / "r" / "predictions.json").read_text())
    assert len(predictions) == 3
    assert "cat.png" in (tmp_path / "r" / "report.html").read_text(encoding="utf-8")


def test_scan_top_k_larger_than_the_classes(tmp_path, capsys):
    from helpers import SmallConvNet

    net = SmallConvNet(classes=3)
    torch.save(net, tmp_path / "full.pt")
    code, _, err = run(
        capsys,
        "scan",
        "sample:coffee",
        "--model",
        str(tmp_path / "full.pt"),
        "--trust-pickle",
        "--methods",
        "gradient",
        "--out",
        str(tmp_path / "r"),
    )
    assert code == 0, err
    assert len(json.loads((tmp_path / "r" / "predictions.json").read_text())) == 3


@pytest.mark.slow
def test_full_default_scan(default_report):
    code, out, _, err = default_report
    assert code == 0, err
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 5 and predictions[0]["class_id"] in DOMESTIC_CATS
    html = (out / "report.html").read_text(encoding="utf-8")
    assert_self_contained(html)
    default = [m for m in cnnscan.list_methods() if getattr(m, "in_default_scan", True)]
    with np.load(out / "maps.npz") as maps:
        top1 = predictions[0]["class_id"]
        assert sorted(maps.files) == sorted(f"{info.name}_class{top1}" for info in default)
    timings = json.loads((out / "timings.json").read_text())
    assert {info.name for info in default} <= set(timings)
    skipped = {m.name for m in cnnscan.list_methods()} - {m.name for m in default}
    assert not skipped & set(timings), "slow methods run only with --full or --methods"


def test_full_flag_selects_every_method(monkeypatch, capsys, tmp_path):
    import cnnscan.report

    chosen = {}

    def fake_run_scan(model, image, *, methods, **kwargs):
        chosen["methods"] = methods
        raise cnnscan.CnnscanError("stop here")

    monkeypatch.setattr(cnnscan.report, "run_scan", fake_run_scan)
    assert run(capsys, "scan", "--full", "--out", str(tmp_path))[0] == 1
    assert chosen["methods"] == [m.name for m in cnnscan.list_methods()]
    assert run(capsys, "scan", "--out", str(tmp_path))[0] == 1
    assert chosen["methods"] == [
        m.name for m in cnnscan.list_methods() if getattr(m, "in_default_scan", True)
    ]


# -- explain, layers, methods ------------------------------------------------------------------
def test_explain_writes_maps_equal_to_the_library(tmp_path, capsys, default_model):
    code, out, err = run(
        capsys,
        "explain",
        "sample:chelsea",
        "--method",
        "gradient_x_input",
        "--targets",
        "285,tabby",
        "--out",
        str(tmp_path),
    )
    assert code == 0, err
    assert "285 Egyptian cat" in out and "281 tabby" in out
    expected = reference_maps(default_model, "gradient_x_input", [285, 281])
    for t, class_id in enumerate([285, 281]):
        raw = np.load(tmp_path / f"gradient_x_input_img0_class{class_id}.npy")
        np.testing.assert_allclose(raw, expected[t], rtol=1e-4, atol=1e-7)
        assert (tmp_path / f"gradient_x_input_img0_class{class_id}.png").is_file()


def test_explain_gradcam_writes_the_overlay_the_report_shows(
    tmp_path, capsys, default_model, chelsea, cat_top1
):
    code, out, err = run(
        capsys, "explain", "sample:chelsea", "--method", "gradcam", "--out", str(tmp_path)
    )
    assert code == 0, err
    stem = tmp_path / f"gradcam_img0_class{cat_top1[0]}"
    assert {p.name for p in tmp_path.iterdir()} == {
        f"{stem.name}.npy",
        f"{stem.name}.png",
        f"{stem.name}_overlay.png",
        "gradcam.json",
    }
    assert "_overlay.png" in out
    # the report's drawing: the heat map over the picture the model saw
    attr = cnnscan.explain(default_model, chelsea, "gradcam", targets=[cat_top1[0]])
    expected = map_picture(attr, 0, 0, np.asarray(default_model.view(chelsea)))
    shown = png_pixels((tmp_path / f"{stem.name}_overlay.png").read_bytes())
    np.testing.assert_array_equal(shown, expected)
    assert not np.array_equal(shown, png_pixels(stem.with_suffix(".png").read_bytes()))


def test_explain_options_reach_the_method(tmp_path, capsys, default_model, cat_top1):
    code, _, err = run(
        capsys,
        "explain",
        "sample:chelsea",
        "--method",
        "smoothgrad",
        "--targets",
        "top1",
        "--option",
        "n_samples=2",
        "--option",
        "noise_level=0.3",
        "--option",
        "base=gradient",
        "--out",
        str(tmp_path),
    )
    assert code == 0, err
    expected = reference_maps(
        default_model, "smoothgrad", [cat_top1[0]], n_samples=2, noise_level=0.3, base="gradient"
    )
    np.testing.assert_allclose(
        np.load(tmp_path / f"smoothgrad_img0_class{cat_top1[0]}.npy"),
        expected[0],
        rtol=1e-4,
        atol=1e-7,
    )
    summary = json.loads((tmp_path / "smoothgrad.json").read_text())
    assert summary["extras"]["n_samples"] == 2


def test_explain_view_is_validated_up_front(capsys):
    with pytest.raises(SystemExit) as info:
        main(["explain", "sample:chelsea", "--method", "gradient", "--view", "nope"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_layers_table(capsys, default_model):
    code, out, err = run(capsys, "layers")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["layer", "type"]
    swish = [line for line in lines if line.startswith("_swish@")]
    assert [line.split()[0] for line in swish] == ["_swish@0", "_swish@1"]
    assert "1280×7×7" in swish[1] and "ReLU6" in swish[1]
    fc = next(line for line in lines if line.startswith("_fc "))
    assert fc.split()[-1] == f"{1280 * 1000 + 1000:,}"
    total = sum(p.numel() for p in default_model.module.parameters())
    assert f"{total:,} parameters" in lines[-1]


def test_layers_leaves_only(capsys):
    code, out, err = run(capsys, "layers", "--model", "resnet18", "--weights", "none", "--leaves")
    assert code == 0, err
    names = [line.split()[0] for line in out.splitlines()[1:-1]]
    assert "layer1.0.conv1" in names and "fc" in names
    assert "layer1" not in names and "layer1.0" not in names


def _table_rows(out: str) -> list[list[str]]:
    """The rows of `cnnscan methods`: lines whose first column is filled start a row."""
    rows: list[list[str]] = []
    for line in out.splitlines():
        if line[:1].strip():
            rows.append([line])
        else:
            rows[-1].append(line)
    return rows


def test_methods_is_an_aligned_table_with_costs_at_100_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = run(capsys, "methods")
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 100
    header, *rows = _table_rows(out)
    columns = [header[0].index(name) for name in ("family", "cost", "description")]
    infos = cnnscan.list_methods()
    assert [row[0].split()[0] for row in rows] == [info.name for info in infos]
    for row, info in zip(rows, infos, strict=True):
        # each column starts where its header does, on every line of the row
        family, cost, description = (
            " ".join(" ".join(line[a:b].split()) for line in row).strip()
            for a, b in zip(columns, [*columns[1:], None], strict=True)
        )
        assert family == info.family
        assert cost.startswith(info.cost or "not stated")
        assert cost.endswith("(slow: scan --full)") == (not info.in_default_scan)
        assert description == info.description
    code, out, _ = run(capsys, "methods", "--family", "gradient")
    assert code == 0
    _, *rows = _table_rows(out)
    assert [row[0].split()[1] for row in rows] == ["gradient"] * len(
        cnnscan.list_methods("gradient")
    )


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"cnnscan {cnnscan.__version__}"


def test_models_lists_matching_names(capsys):
    code, out, err = run(capsys, "models", "*vgg1*")
    assert code == 0, err
    assert out.split() == cnnscan.list_models("*vgg1*") and "vgg16" in out.split()
    code, _, err = run(capsys, "models", "no-such-net")
    assert code == 1 and "no model name matches" in err


def test_every_command_returns_an_exit_code():
    """A command that falls off its end returns None, which `main` would hand to sys.exit."""
    import ast
    import inspect

    import cnnscan.cli as cli

    tree = ast.parse(inspect.getsource(cli))
    commands = [
        f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.startswith("_cmd_")
    ]
    assert len(commands) == len(cli._COMMANDS)
    for function in commands:
        assert isinstance(function.body[-1], (ast.Return, ast.Raise)), function.name


# -- errors: one line, no traceback, exit code 1 --------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["scan", "no/such/cat.jpg", "--methods", "gradient"], "no such image file"),
        (["explain", "sample:dog", "--method", "gradient"], "unknown sample"),
        (["scan", "--model", "resnet5", "--methods", "gradient"], "resnet50"),
        (["scan", "--methods", "gradient,saliencyy"], "unknown method"),
        (["explain", "sample:chelsea", "--method", "gradcm"], "unknown method"),
        (["explain", "sample:chelsea", "--method", "gradient", "--targets", "1000"], "range"),
        (["explain", "sample:chelsea", "--method", "gradient", "--targets", "kat"], "class name"),
        (["explain", "sample:chelsea", "--method", "gradient", "--option", "x"], "KEY=VALUE"),
        (["explain", "sample:chelsea", "--method", "gradient", "--option", "n=1"], "no option"),
        (["layers", "--weights", "/no/such/weights.pt"], "no such weights file"),
        (["methods", "--family", "nope"], "unknown family"),
    ],
)
def test_errors_print_one_line(capsys, tmp_path, argv, needle):
    if argv[0] in ("scan", "explain"):
        argv = [*argv, "--out", str(tmp_path)]
    code, _, err = run(capsys, *argv)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cnnscan: error"), err
    assert needle in lines[0]
    assert "Traceback" not in err


def test_bad_layer_is_one_line(capsys, tmp_path):
    layered = [info for info in cnnscan.list_methods() if "layer" in info.options()]
    if not layered:
        pytest.skip("no registered method takes a layer yet")
    code, _, err = run(
        capsys,
        "explain",
        "sample:chelsea",
        "--method",
        layered[0].name,
        "--layer",
        "_swish@7",
        "--out",
        str(tmp_path),
    )
    assert code == 1
    (line,) = err.strip().splitlines()
    assert line.startswith("cnnscan: error") and "_swish" in line


def test_unknown_layer_names_five_close_ones_and_the_listing(capsys, tmp_path):
    argv = ["explain", "sample:chelsea", "--method", "gradcam", "--out", str(tmp_path)]
    code, _, err = run(capsys, *argv, "--layer", "_blocks.99._bn")
    assert code == 1
    (line,) = err.strip().splitlines()
    message = line.removeprefix("cnnscan: error: ")
    assert len(message) <= 400  # was about 60 names on one line
    assert "`cnnscan layers` lists all" in message
    close = message.split("Did you mean: ")[1].split("?")[0].split(", ")
    assert 1 <= len(close) <= 5 and all(name.startswith("_blocks.") for name in close)


def test_damaged_image_file(capsys, tmp_path):
    (tmp_path / "cat.jpg").write_text("not a jpeg")
    code, _, err = run(
        capsys, "explain", str(tmp_path / "cat.jpg"), "--method", "gradient", "--out", str(tmp_path)
    )
    assert code == 1
    (line,) = err.strip().splitlines()
    assert line.startswith("cnnscan: error") and "cat.jpg" in line


def test_top_k_must_be_positive(capsys):
    with pytest.raises(SystemExit) as info:
        main(["scan", "--top-k", "0"])
    assert info.value.code == 2
    assert "positive" in capsys.readouterr().err


# -- help ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["scan", "explain", "layers", "methods"])
def test_help_shows_examples(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert f"cnnscan {command}" in out.split("examples:")[1]


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("scan", "explain", "layers", "methods"):
        assert command in out


# -- as a real process -----------------------------------------------------------------------------
def _subprocess(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_exit_codes_of_the_real_command(tmp_path):
    ok = _subprocess(sys.executable, "-m", "cnnscan.cli", "methods", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "gradient" in ok.stdout
    bad = _subprocess(
        sys.executable,
        "-m",
        "cnnscan.cli",
        "explain",
        "missing.jpg",
        "--method",
        "gradient",
        cwd=tmp_path,
    )
    assert bad.returncode == 1
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith("cnnscan: error") and "missing.jpg" in line
    usage = _subprocess(sys.executable, "-m", "cnnscan.cli", "scan", "--nope", cwd=tmp_path)
    assert usage.returncode == 2


@pytest.mark.skipif(shutil.which("cnnscan") is None, reason="the cnnscan script is not installed")
def test_installed_script(tmp_path):
    result = _subprocess(
        shutil.which("cnnscan"), "explain", "nope.png", "--method", "gradient", cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stderr.startswith("cnnscan: error")


def test_help_imports_no_torch_nor_the_heavy_extras():
    """`cnnscan --help` answers without loading torch, pyarrow, scikit-image or Streamlit."""
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "import cnnscan.cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    for argv in (['--help'], ['scan', '--help'], ['batch', '--help']):\n"
        "        try:\n"
        "            cnnscan.cli.main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "heavy = ('torch', 'pyarrow', 'skimage', 'streamlit', 'ray', 'keras', 'matplotlib')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
