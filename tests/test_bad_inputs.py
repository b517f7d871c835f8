"""The bad-input matrix, through the library and the CLI: odd-but-valid pictures are
converted, everything else is refused with a one-line error that names the fix, the CLI never
prints a traceback and never leaves a partial output folder. Hypothesis fuzzes load_image.
(Library-level checks that already live in test_images.py / test_models.py are not repeated.)"""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SmallConvNet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from torch import nn

import cnnscan
from cnnscan import ImageError, ModelError, load_image
from cnnscan.cli import main


def noise(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def encoded(pixels: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width × height but holds no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>gone</body></html>\n"


# -- the files of the matrix -----------------------------------------------------------------------
def write_bad_images(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, a word the error must contain)."""
    jpeg = encoded(noise(64, 64), "JPEG")
    png = encoded(noise(64, 64), "PNG")
    files = {
        "empty.jpg": (b"", "empty"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "text.png": (b"just some notes, not a picture\n" * 10, "not an image"),
        "page.jpg": (HTML, "not an image"),
        "bomb.png": (png_header_only(12_000, 8_000), "96 MP"),
    }
    out = {}
    for name, (data, needle) in files.items():
        (folder / name).write_bytes(data)
        out[name] = (folder / name, needle)
    (folder / "a folder.jpg").mkdir()
    out["folder"] = (folder / "a folder.jpg", "folder")
    out["missing"] = (folder / "missing.jpg", "no such image file")
    return out


def write_odd_images(folder: Path) -> dict[str, Path]:
    """Odd but valid pictures, each converted to RGB."""
    paths = {}

    def save(name: str, image: Image.Image, **kwargs) -> None:
        image.save(folder / name, **kwargs)
        paths[name] = folder / name

    save("one_pixel.png", Image.new("RGB", (1, 1), (200, 30, 40)))
    save(
        "sixteen_bit.png",
        Image.fromarray((np.arange(96 * 64).reshape(64, 96) * 10).astype(np.uint16)),
    )
    palette = Image.new("P", (32, 24), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.info["transparency"] = 1
    save("palette_transparent.png", palette)
    save("rgba.png", Image.fromarray(noise(24, 32, 4)))
    save("la.png", Image.fromarray(noise(24, 32, 2), "LA"))
    save("cmyk.jpg", Image.new("CMYK", (32, 24), (0, 255, 255, 0)))
    frames = [Image.new("RGB", (32, 24), c) for c in [(255, 0, 0), (0, 255, 0)]]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:])
    save("pages.tiff", frames[0], save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6
    save("rotated.jpg", Image.fromarray(noise(24, 48)), exif=exif)
    return paths


# -- library: the gaps in test_images.py ----------------------------------------------------------
def test_html_page_named_jpg():
    with pytest.raises(ImageError, match="not an image"):
        load_image(HTML)


def test_one_pixel_image(tmp_path):
    Image.new("RGB", (1, 1), (200, 30, 40)).save(tmp_path / "one.png")
    image = load_image(tmp_path / "one.png")
    assert image.size == (1, 1) and image.getpixel((0, 0)) == (200, 30, 40)
    model = cnnscan.load_model(SmallConvNet(classes=5))
    x = model.preprocess(image)  # upsampled to the model's input size
    assert x.shape == (1, 3, 224, 224)
    expected = (
        torch.tensor([200, 30, 40]) / 255 - torch.tensor(model.preprocessing.mean)
    ) / torch.tensor(model.preprocessing.std)
    torch.testing.assert_close(x[0, :, 100, 100], expected.float(), rtol=0, atol=1e-6)


def test_multi_page_tiff_gives_the_first_page(tmp_path):
    pages = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    pages[0].save(tmp_path / "p.tiff", save_all=True, append_images=pages[1:])
    assert Image.open(tmp_path / "p.tiff").n_frames == 3
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "p.tiff"))[4, 4], [255, 0, 0])


def test_every_odd_image_converts_as_pil_would(tmp_path):
    for name, path in write_odd_images(tmp_path).items():
        image = load_image(path)
        assert image.mode == "RGB", name
        upright = ImageOps.exif_transpose(Image.open(path))
        assert image.size == upright.size, name


# -- the CLI: one line, no traceback, no output folder ---------------------------------------
class NaNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3)) * float("nan")


class FeatureMapNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("matrix")
    torch.manual_seed(0)
    torch.save(SmallConvNet(classes=5), folder / "tiny.pt")
    torch.save(NaNNet(), folder / "nan.pt")
    torch.save(FeatureMapNet(), folder / "feature_map.pt")
    (folder / "not_a_model.pt").write_text("weights? no.\n")
    (folder / "not_a_model.onnx").write_bytes(b"\x08\x07junk" * 10)
    (folder / "not_a_model.keras").write_text("nope")
    import torchvision

    torch.save(torchvision.models.squeezenet1_0().state_dict(), folder / "squeezenet1_0.pt")
    (folder / "labels.txt").write_text("ant\nbee\ncat\ndog\neel\n")
    return folder


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, needle: str, out_dir: Path) -> None:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cnnscan: error: "), err  # a CnnscanError, not a crash
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out_dir.exists(), f"partial output left in {out_dir}"


BAD_IMAGES = ["empty.jpg", "truncated.jpg", "truncated.png", "text.png", "page.jpg", "bomb.png"]


@pytest.mark.parametrize("name", [*BAD_IMAGES, "folder", "missing"])
@pytest.mark.parametrize("command", ["scan", "explain"])
def test_cli_bad_images(capsys, tmp_path, files, name, command):
    path, needle = write_bad_images(tmp_path)[name]
    out = tmp_path / "out"
    argv = [command, str(path), "--model", str(files / "tiny.pt"), "--trust-pickle"]
    argv += ["--methods", "gradient"] if command == "scan" else ["--method", "gradient"]
    started = time.perf_counter()
    code, _, err = run_cli(capsys, [*argv, "--out", str(out)])
    assert_one_line_error(code, err, needle, out)
    assert time.perf_counter() - started < 5  # the bomb is refused from its header


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--model", "{files}/not_a_model.pt"], "not a model file"),
        (["--model", "{files}/not_a_model.onnx"], "not an ONNX model"),
        (["--model", "{files}/not_a_model.keras"], "not a Keras model"),
        (["--model", "{files}/tiny.pt"], "--trust-pickle"),
        (
            ["--model", "squeezenet1_1", "--weights", "{files}/squeezenet1_0.pt"],
            "features.0.weight",
        ),
        (["--model", "{files}/nan.pt", "--trust-pickle"], "NaN"),
        (["--model", "{files}/feature_map.pt", "--trust-pickle"], "shape"),
        (["--model", "{files}/tiny.pt", "--trust-pickle", "--targets", "5"], "out of range"),
        (
            [
                *("--model", "{files}/tiny.pt", "--trust-pickle", "--targets", "cats"),
                "--labels",
                "{files}/labels.txt",
            ],
            "Close matches: cat",
        ),
        (
            [
                *("--model", "{files}/tiny.pt", "--trust-pickle", "--method", "gradcam"),
                "--layer",
                "conv9",
            ],
            "`cnnscan layers` lists all",
        ),
        (["--model", "resnet5"], "Did you mean"),
    ],
)
def test_cli_bad_models_and_targets(capsys, tmp_path, files, extra, needle):
    out = tmp_path / "out"
    argv = [part.format(files=files) for part in extra]
    if "--method" not in argv:
        argv += ["--method", "gradient"]
    if "--weights" not in argv and "resnet5" not in argv:
        argv += ["--weights", "none"]
    code, _, err = run_cli(capsys, ["explain", "sample:coffee", *argv, "--out", str(out)])
    assert_one_line_error(code, err, needle, out)


def test_cli_unknown_layer_names_the_closest_and_the_listing(capsys, tmp_path, files):
    code, _, err = run_cli(
        capsys,
        [
            *("explain", "sample:coffee", "--model", str(files / "tiny.pt"), "--trust-pickle"),
            *("--method", "gradcam", "--layer", "conv9", "--out", str(tmp_path / "out")),
        ],
    )
    assert code == 1
    valid = [
        name
        for name, _ in torch.load(files / "tiny.pt", weights_only=False).named_modules()
        if name
    ]
    close = err.split("Did you mean: ")[1].split("?")[0].split(", ")
    assert close and set(close) <= set(valid) and len(close) <= 5
    assert f"`cnnscan layers` lists all {len(valid)}" in err


@pytest.mark.parametrize(
    "name",
    [
        "one_pixel.png",
        "sixteen_bit.png",
        "palette_transparent.png",
        "rgba.png",
        "la.png",
        "cmyk.jpg",
        "animated.gif",
        "pages.tiff",
        "rotated.jpg",
    ],
)
def test_cli_converts_odd_images(capsys, tmp_path, files, name):
    path = write_odd_images(tmp_path)[name]
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys,
        [
            *("explain", str(path), "--model", str(files / "tiny.pt"), "--trust-pickle"),
            *("--method", "gradient", "--targets", "2", "--out", str(out)),
        ],
    )
    assert code == 0, err
    # The written map is the one of the picture PIL itself decodes and turns upright.
    reference = Image.open(path)
    reference.seek(0)
    upright = ImageOps.exif_transpose(
        reference.convert("RGBA") if name != "rotated.jpg" else reference
    )
    background = Image.new("RGBA", upright.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(background, upright.convert("RGBA")).convert("RGB")
    model = cnnscan.load_model(str(files / "tiny.pt"), trust_pickle=True)
    if name != "sixteen_bit.png":  # PIL's own conversion clips 16-bit values; ours scales them
        expected = cnnscan.explain(model, model.preprocessing(rgb), "gradient", targets=[2])
        np.testing.assert_allclose(
            np.load(out / "gradient_img0_class2.npy"),
            expected.maps[0, 0].numpy(),
            rtol=1e-4,
            atol=1e-6,
        )


# -- fuzzing load_image --------------------------------------------------------------------------
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples in every CI run
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"II*\x00", b"BM", b"RIFF"]


def _loads_or_refuses(data: bytes) -> None:
    try:
        image = load_image(data)
    except ImageError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert image.mode == "RGB" and min(image.size) >= 1


@FUZZ
@given(prefix=st.sampled_from(MAGIC), body=st.binary(max_size=2048))
def test_fuzz_random_bytes_load_or_raise_image_error(prefix, body):
    _loads_or_refuses(prefix + body)


@FUZZ
@given(
    fmt=st.sampled_from(["PNG", "JPEG", "GIF", "TIFF", "BMP"]),
    cut=st.floats(0.0, 1.0),
    flip=st.integers(0, 10**6),
)
def test_fuzz_damaged_real_files(fmt, cut, flip):
    data = bytearray(encoded(noise(20, 30, seed=flip % 7), fmt))
    data[flip % len(data)] ^= 0xFF  # one corrupted byte...
    _loads_or_refuses(bytes(data[: max(1, int(len(data) * cut))]))  # ...and a truncation


MODES = {
    "L": ["PNG", "BMP", "TIFF", "GIF"],
    "RGB": ["PNG", "BMP", "TIFF", "JPEG"],
    "RGBA": ["PNG", "TIFF"],
    "LA": ["PNG"],
    "P": ["PNG", "GIF", "BMP"],
    "I;16": ["PNG", "TIFF"],
    "1": ["PNG", "BMP", "TIFF"],
    "CMYK": ["JPEG", "TIFF"],
}


@st.composite
def valid_images(draw):
    mode = draw(st.sampled_from(sorted(MODES)))
    fmt = draw(st.sampled_from(MODES[mode]))
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    else:
        bands = len(Image.new(mode, (1, 1)).getbands())
        pixels = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
        image = Image.frombytes(mode, (width, height), pixels.tobytes()) if mode != "1" else None
        if mode == "1":
            image = Image.fromarray(pixels[:, :, 0] > 127)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return mode, fmt, image, buffer.getvalue()


@FUZZ
@given(case=valid_images())
def test_fuzz_valid_images_always_convert(case):
    mode, fmt, original, data = case
    image = load_image(data)
    assert image.mode == "RGB"
    assert image.size == original.size
    if mode in ("RGB", "L", "1") and fmt in ("PNG", "BMP", "TIFF"):  # lossless, opaque
        np.testing.assert_array_equal(np.asarray(image), np.asarray(original.convert("RGB")))


def test_loading_a_model_twice_from_the_matrix_does_not_leak_state(files):
    # A refused pickle leaves nothing behind: the same file loads when trusted.
    with pytest.raises(ModelError, match="trust_pickle"):
        cnnscan.load_model(files / "tiny.pt")
    assert cnnscan.load_model(files / "tiny.pt", trust_pickle=True).num_classes == 5
