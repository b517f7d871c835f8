"""The web app's computations without Streamlit (cnnscan.app.core, pictures, exports, jobs):
uploads and their errors, model choices and weight files, per-target cells and their cache,
cell pictures and colour bars, downloads, background synthesis. References: PIL decoding,
direct library calls (`cnnscan.explain`, `render`, `class_image`), hand-built files."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from helpers import SmallConvNet, UnpickleMarker, header_only_png
from PIL import Image

import cnnscan
from cnnscan import render
from cnnscan.app import core, exports, jobs, launch, pictures, sources
from cnnscan.errors import ImageError, MethodError, ModelError
from cnnscan.models.preprocessing import Preprocessing

TINY = Preprocessing(size=(32, 32), resize_shorter=None)


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_model() -> cnnscan.Model:
    return cnnscan.load_model(SmallConvNet(), preprocessing=TINY)


@pytest.fixture
def tiny_workspace(tiny_model, photo) -> core.Workspace:
    picture = sources.SourceImage(Image.fromarray(photo), "photo.png", "digest-photo")
    return core.Workspace(tiny_model, "tiny", picture, core.ResultCache())


# -- uploads --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("BMP", "bmp"), ("TIFF", "tiff")])
def test_lossless_uploads_decode_to_the_same_pixels(photo, fmt, suffix):
    picture = sources.read_upload(f"a.{suffix}", png_bytes(photo, fmt), 20)
    np.testing.assert_array_equal(np.asarray(picture.image), photo)
    assert picture.name == f"a.{suffix}"


@pytest.mark.parametrize("fmt, suffix", [("JPEG", "jpg"), ("WEBP", "webp")])
def test_lossy_uploads_decode_like_pil(photo, fmt, suffix):
    data = png_bytes(photo, fmt)
    picture = sources.read_upload(f"a.{suffix}", data, 20)
    np.testing.assert_array_equal(
        np.asarray(picture.image), np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    )


def test_same_bytes_same_digest_other_bytes_other_digest(photo):
    a = sources.read_upload("a.png", png_bytes(photo), 20)
    b = sources.read_upload("b.png", png_bytes(photo), 20)
    c = sources.read_upload("c.png", png_bytes(photo[::-1].copy()), 20)
    assert a.digest == b.digest != c.digest


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("notes.png", b"this is not a picture at all", "notes.png is not an image"),
        ("empty.png", b"", "empty"),
        ("cat.gif", b"GIF89a", ".gif files are not accepted"),
        ("noext", b"\x89PNG", ".? files are not accepted"),
        ("bomb.png", header_only_png(10_000, 10_000), "above the 90 MP limit"),
    ],
)
def test_bad_uploads_say_what_is_wrong(name, data, message):
    with pytest.raises(ImageError, match=message.replace(".", r"\.").replace("?", r"\?")):
        sources.read_upload(name, data, 20)


def test_truncated_upload_is_reported(photo):
    data = png_bytes(np.tile(photo, (4, 4, 1)))
    with pytest.raises(ImageError, match="damaged or truncated"):
        sources.read_upload("cut.png", data[: len(data) // 2], 20)


def test_upload_over_the_limit_is_refused_before_decoding():
    data = b"\x00" * (2**20 + 1)
    with pytest.raises(ImageError, match=r"1\.0 MB, above the 1 MB upload limit"):
        sources.read_upload("big.png", data, 1)


# -- models and weight files ----------------------------------------------------------------------
def test_config_from_environment():
    assert sources.AppConfig.from_env({}) == sources.AppConfig(False, 20)
    config = sources.AppConfig.from_env(
        {sources.ENV_ALLOW_LOCAL_FILES: "1", sources.ENV_MAX_UPLOAD_MB: "5"}
    )
    assert config == sources.AppConfig(True, 5)


def test_model_names_start_with_the_bundled_default():
    names = sources.model_names()
    assert names[0] == "efficientnet_lite0"
    assert names[1:] == [n for n in cnnscan.list_models() if n != "efficientnet_lite0"]
    assert {"resnet18", "vgg16", "convnext_tiny"} <= set(names)


def test_local_files_are_off_unless_allowed(tmp_path):
    file = tmp_path / "w.pt"
    torch.save({}, file)
    with pytest.raises(ModelError, match="--allow-local-files"):
        sources.weights_file(str(file), sources.AppConfig())
    with pytest.raises(ModelError, match="--allow-local-files"):
        sources.load_choice(
            sources.ModelChoice("squeezenet1_1", "file", str(file)), sources.AppConfig()
        )


def test_only_existing_weight_files_are_read(tmp_path):
    allowed = sources.AppConfig(allow_local_files=True)
    with pytest.raises(ModelError, match="not a weights file"):
        sources.weights_file("/etc/passwd", allowed)
    with pytest.raises(ModelError, match="not a weights file"):
        sources.weights_file(str(tmp_path / "model.pkl"), allowed)
    with pytest.raises(ModelError, match="no weights file"):
        sources.weights_file(str(tmp_path / "missing.pth"), allowed)


def test_a_pickled_object_is_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    file = tmp_path / "model.pt"
    torch.save(UnpickleMarker(marker), file)
    choice = sources.ModelChoice("squeezenet1_1", "file", str(file))
    with pytest.raises(ModelError, match="not a plain state_dict"):
        sources.load_choice(choice, sources.AppConfig(allow_local_files=True))
    assert not marker.exists()


def test_a_state_dict_file_loads_into_the_named_architecture(tmp_path):
    import torchvision

    torch.manual_seed(0)
    source = torchvision.models.squeezenet1_1(weights=None)
    file = tmp_path / "squeeze.pth"
    torch.save(source.state_dict(), file)
    choice = sources.ModelChoice("squeezenet1_1", "file", str(file))
    model = sources.load_choice(choice, sources.AppConfig(allow_local_files=True))
    for (name, mine), theirs in zip(
        model.module.state_dict().items(), source.state_dict().values(), strict=True
    ):
        assert torch.equal(mine, theirs), name
    assert choice.key().startswith("squeezenet1_1|file:")
    assert sources.ModelChoice().key() == "efficientnet_lite0|imagenet"


# -- columns, options, cells ----------------------------------------------------------------------
def test_options_are_checked_against_the_method_signature():
    ig = cnnscan.get_method("integrated_gradients")
    assert core.parse_options(ig, ' {"seed": 1, "n_steps": 8} ') == '{"n_steps": 8, "seed": 1}'
    assert core.parse_options(ig, "") == "{}"
    with pytest.raises(MethodError, match="has no option bogus; its options: n_steps"):
        core.parse_options(ig, '{"bogus": 1}')
    with pytest.raises(MethodError, match="JSON object"):
        core.parse_options(ig, "n_steps=8")
    with pytest.raises(MethodError, match="JSON object"):
        core.parse_options(ig, "[1]")
    with pytest.raises(MethodError, match="Layers control"):
        core.parse_options(cnnscan.get_method("gradcam"), '{"layer": "conv2"}')


def test_layer_methods_get_one_column_per_layer():
    columns = core.columns_for(
        ["gradient", "gradcam"], ["conv2", "conv3"], {"gradient": '{"unit": null}'}
    )
    assert [(c.method, c.layer, c.options) for c in columns] == [
        ("gradient", None, '{"unit": null}'),
        ("gradcam", "conv2", "{}"),
        ("gradcam", "conv3", "{}"),
    ]
    assert [c.title for c in columns] == ["gradient", "gradcam @ conv2", "gradcam @ conv3"]
    assert core.columns_for(["gradcam"], [], {})[0].layer is None


def test_default_screen_is_gradcam():
    assert core.first_screen_methods() == ["gradcam"]


def test_cells_equal_the_library_called_per_target(tiny_workspace, tiny_model):
    ws = tiny_workspace
    targets = [3, 0, 4]
    for column in [
        core.Column("gradcam", "conv2"),
        core.Column("guided_backprop"),
        core.Column("integrated_gradients", None, '{"n_steps": 8}'),
    ]:
        cells = ws.explain(column, targets)
        for target, cell in zip(targets, cells, strict=True):
            expected = cnnscan.explain(
                tiny_model,
                ws.picture.image,
                column.method,
                targets=[target],
                layer=column.layer,
                **column.option_values(),
            )
            assert cell.targets.tolist() == [[target]]
            torch.testing.assert_close(cell.maps, expected.maps, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(cell.scores, expected.scores)
            for key, value in expected.extras.items():
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(cell.extras[key], value, rtol=1e-5, atol=1e-6)


def test_only_missing_targets_are_computed(tiny_workspace, monkeypatch):
    ws = tiny_workspace
    calls = []
    original = core.run_method

    def counting(scan, info, targets, *args, **kwargs):
        calls.append(targets.tolist())
        return original(scan, info, targets, *args, **kwargs)

    monkeypatch.setattr(core, "run_method", counting)
    column = core.Column("gradient")
    first = ws.explain(column, [1, 2])
    again = ws.explain(column, [2, 1])
    more = ws.explain(column, [2, 3, 1])
    assert calls == [[[1, 2]], [[3]]]
    assert again[0] is first[1] and again[1] is first[0]
    assert more[0] is first[1] and more[2] is first[0]
    other_picture = core.Workspace(
        ws.model, ws.model_key, sources.SourceImage(ws.picture.image, "x", "other"), ws.results
    )
    other_picture.explain(column, [1])
    assert calls[-1] == [[1]]  # another picture is another key


def test_split_and_join_targets_round_trip(tiny_workspace):
    scan = tiny_workspace.scan
    attr = cnnscan.explain(
        tiny_workspace.model, None, "integrated_gradients", targets=[1, 3], scan=scan, n_steps=4
    )
    parts = core.split_targets(attr, 2)
    assert [p.targets.tolist() for p in parts] == [[[1]], [[3]]]
    assert parts[1].extras["completeness_error"].shape == (1, 1)
    joined = core.join_targets(parts)
    assert torch.equal(joined.maps, attr.maps)
    assert torch.equal(joined.extras["completeness_error"], attr.extras["completeness_error"])
    assert joined.extras["n_steps"] == attr.extras["n_steps"]


def test_result_cache_drops_the_least_recently_used():
    cache = core.ResultCache(max_bytes=3 * 400)
    for key in "abc":
        cache.put(key, torch.zeros(100))  # 400 bytes each
    assert cache.get("a") is not None  # "b" is now the least recently used
    cache.put("d", torch.zeros(100))
    assert cache.get("b") is None
    assert all(cache.get(k) is not None for k in "acd")
    assert len(cache) == 3


def test_feature_maps_are_the_layers_activations(tiny_workspace, tiny_model):
    maps = tiny_workspace.feature_maps("conv2")
    expected = cnnscan.feature_maps(tiny_model, tiny_workspace.picture.image, "conv2")["conv2"][0]
    torch.testing.assert_close(maps, expected)
    with pytest.raises(MethodError, match="not feature maps"):
        tiny_workspace.feature_maps("fc")
    assert tiny_workspace.spatial_layers()[:3] == ["conv1", "acts.relu@0", "pool"]


# -- pictures -------------------------------------------------------------------------------------
def test_cell_pictures_are_the_library_views_with_a_colour_bar(tiny_workspace):
    ws = tiny_workspace
    (cell,) = ws.explain(core.Column("gradcam", "conv2"), [2])
    size = ws.view.size[::-1]
    overlay = pictures.cell_picture(cell, "overlay", ws.view, alpha=0.3, cmap="viridis")
    expected = render.overlay(ws.view, cell.view(0, 0, "heatmap"), alpha=0.3, cmap="viridis")
    np.testing.assert_array_equal(overlay[: size[0]], expected)
    assert overlay.shape[1] == size[1] and overlay.shape[0] > size[0] + 10
    np.testing.assert_array_equal(
        overlay[size[0] + 3 : size[0] + 13], render.colorbar(size[1], "viridis")
    )
    heat = pictures.cell_picture(cell, "heatmap", ws.view, cmap="inferno")
    np.testing.assert_array_equal(
        heat[: size[0]], render.to_rgb(cell.view(0, 0, "heatmap"), "inferno")
    )
    raw = pictures.cell_picture(cell, "raw", ws.view)
    np.testing.assert_array_equal(
        raw[: size[0]], render.to_rgb(cell.view(0, 0, "signed"), render.DIVERGING)
    )
    assert not np.array_equal(overlay, heat)
    with pytest.raises(ValueError, match="unknown view"):
        pictures.cell_picture(cell, "sepia", ws.view)


# -- downloads ------------------------------------------------------------------------------------
def _run(ws):
    columns = [core.Column("gradcam", "conv3"), core.Column("gradient")]
    targets = [4, 1]
    cells, pngs = {}, {}
    for column in columns:
        for t, cell in zip(targets, ws.explain(column, targets), strict=True):
            cells[(column, t)] = cell
            pngs[(column, t)] = pictures.picture_png(
                pictures.cell_picture(cell, "overlay", ws.view)
            )
    return columns, targets, cells, pngs


def test_zip_holds_every_cell_its_raw_map_and_a_summary(tiny_workspace):
    ws = tiny_workspace
    columns, targets, cells, pngs = _run(ws)
    data = exports.run_zip(ws, columns, targets, cells, pngs, {"view": "overlay"})
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = set(archive.namelist())
        assert names == {
            "input.png",
            "summary.json",
            *(
                f"{c.file_stem}/class{t}.{ext}"
                for c in columns
                for t in targets
                for ext in ("png", "npy")
            ),
        }
        raw = np.load(io.BytesIO(archive.read("gradcam@conv3/class1.npy")))
        np.testing.assert_array_equal(raw, cells[(columns[0], 1)].maps[0, 0].numpy())
        assert archive.read("gradient/class4.png") == pngs[(columns[1], 4)]
        summary = json.loads(archive.read("summary.json"))
    probabilities = ws.scan.probabilities[0]
    assert [row["class_id"] for row in summary["targets"]] == targets
    for row in summary["targets"]:
        assert row["probability"] == pytest.approx(float(probabilities[row["class_id"]]))
        rank = int((probabilities > probabilities[row["class_id"]]).sum()) + 1
        assert row["rank"] == rank
    assert [c["title"] for c in summary["columns"]] == ["gradcam @ conv3", "gradient"]
    assert all(c["seconds"] > 0 for c in summary["columns"])
    assert summary["view"] == {"view": "overlay"}
    assert len(summary["cells"]) == 4


def test_html_report_of_the_run(tiny_workspace):
    ws = tiny_workspace
    columns, targets, cells, _ = _run(ws)
    html = exports.report_html(ws, columns, targets, cells).decode("utf-8")
    assert html.startswith("<!DOCTYPE html>")
    for name in ("gradcam", "gradient", "class 4", "class 1", "conv2", "What the network learned"):
        assert name in html
    assert "http://" not in html and "https://" not in html.split("</style>")[0]
    pictures = html.count("data:image/png;base64,") + html.count("data:image/webp;base64,")
    assert pictures >= 1 + 2 * len(columns) * len(targets)  # each map alone and over the photo


def test_html_report_carries_the_leaderboard_computed_in_the_page(tiny_workspace):
    from cnnscan.app import evaluation
    from cnnscan.metrics.leaderboard import leaderboard

    ws = tiny_workspace
    columns, targets, cells, _ = _run(ws)
    rows = evaluation.leaderboard_rows(ws, columns, cells, targets[0], steps=5)
    attrs = {c.title: cells[(c, targets[0])] for c in columns}
    expected = leaderboard(
        ws.model, None, attrs, ["deletion_auc", "insertion_auc", "completeness"], steps=5
    )
    assert [(r["method"], r["deletion_auc"]) for r in rows] == [
        (r["method"], r["deletion_auc"]) for r in expected
    ]
    assert evaluation.leaderboard_rows(ws, columns, cells, targets[0], steps=5) is rows  # cached
    options = evaluation.report_options(5, sanity=False)
    html = exports.report_html(ws, columns, targets, cells, (rows, options)).decode("utf-8")
    assert "Leaderboard: which map to trust (4 class 4)" in html
    assert "the sanity check was not ticked" in html
    assert "gradcam @ conv3" in html.split("Leaderboard")[1]


# -- synthesis jobs -------------------------------------------------------------------------------
def test_job_reports_every_step_and_matches_the_library(default_model, chelsea):
    picture = sources.sample_picture("chelsea")
    request = jobs.SynthesisRequest("class image", steps=3, size=64, class_id=285)
    cache = core.ResultCache()
    job = jobs.Job(default_model, picture, request, cache, ("k",))
    assert job.wait(300) == "done", job.error
    expected = cnnscan.class_image(default_model, 285, steps=3, size=64, seed=0)
    assert torch.equal(job.result.pixels, expected.pixels)
    assert job.result.history == expected.history
    assert job.step == job.total == 3
    again = jobs.Job(default_model, picture, request, cache, ("k",))
    assert again.state == "done" and again.result is job.result  # cached: instant


def test_job_stops_when_asked(default_model):
    picture = sources.sample_picture("chelsea")
    request = jobs.SynthesisRequest("channel", steps=500, size=64, layer="_blocks.2", unit=3)
    job = jobs.Job(default_model, picture, request, core.ResultCache(), ("stop",))
    while job.step < 2 and job.running:
        job.wait(0.05)
    job.stop()
    assert job.wait(120) == "stopped"
    assert 2 <= job.step < 500 and job.result is None


def test_job_failure_is_a_message(default_model):
    picture = sources.sample_picture("chelsea")
    request = jobs.SynthesisRequest("deepdream", steps=2, octaves=1, layer="no_such_layer")
    job = jobs.Job(default_model, picture, request, core.ResultCache(), ("bad",))
    assert job.wait(120) == "failed"
    assert "no layer named 'no_such_layer'" in job.error


def test_requests_call_the_matching_library_function(default_model, monkeypatch):
    called = {}

    def fake(name):
        def record(*args, **kwargs):
            called[name] = (args[1:], kwargs)
            return "result"

        return record

    for name in ("class_image", "synthesize", "deepdream", "invert"):
        monkeypatch.setattr(cnnscan, name, fake(name))
    picture = sources.sample_picture("coffee")
    for kind in jobs.KINDS:
        request = jobs.SynthesisRequest(kind, steps=5, layer="_blocks.3", unit=2, class_id=7)
        assert jobs.run_request(default_model, picture, request) == "result"
    assert called["class_image"][0] == (7,)
    assert called["deepdream"][0] == (picture.image, "_blocks.3")
    assert called["deepdream"][1]["octaves"] == 3
    assert called["invert"][0] == (picture.image, "_blocks.3")
    assert called["synthesize"][0][0].name.startswith("neuron")  # the last of channel/neuron
    assert jobs.request_key("m", picture, jobs.SynthesisRequest("channel"))[2] == ""
    assert jobs.request_key("m", picture, jobs.SynthesisRequest("deepdream"))[2] == picture.digest


# -- the launcher ---------------------------------------------------------------------------------
def test_server_command_and_environment():
    command = launch.command(8600, "127.0.0.1", 7)
    flags = dict(zip(command[5::2], command[6::2], strict=True))
    assert command[1:5] == ["-m", "streamlit", "run", str(cnnscan.app.PAGE)]
    assert flags["--server.headless"] == "true"
    assert flags["--browser.gatherUsageStats"] == "false"
    assert flags["--server.fileWatcherType"] == "none"
    assert flags["--server.maxUploadSize"] == "7"
    assert flags["--server.port"] == "8600" and flags["--server.address"] == "127.0.0.1"
    env = launch.environment(True, 7)
    assert env[sources.ENV_ALLOW_LOCAL_FILES] == "1" and env[sources.ENV_MAX_UPLOAD_MB] == "7"
    assert launch.url_of("0.0.0.0", 80) == "http://127.0.0.1:80"
    assert launch.url_of("::1", 80) == "http://[::1]:80"


def test_app_command_help(capsys):
    from cnnscan.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["app", "--help"])
    out = capsys.readouterr().out
    assert stopped.value.code == 0
    for flag in ("--port", "--host", "--allow-local-files", "--max-upload-mb", "cnnscan app"):
        assert flag in out
