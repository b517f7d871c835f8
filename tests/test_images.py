"""`load_image`: real files written with PIL, odd-but-valid pictures converted, bad input
rejected with an ImageError that names the problem."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, features

import cnnscan
from cnnscan import ImageError, load_image


def rgb(image: Image.Image) -> np.ndarray:
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    return np.asarray(image)


def noise(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# -- formats ------------------------------------------------------------------------------
LOSSLESS = ["png", "bmp", "tiff"]
FORMATS = [
    *LOSSLESS,
    "jpeg",
    "gif",
    pytest.param(
        "webp", marks=pytest.mark.skipif(not features.check("webp"), reason="Pillow without WebP")
    ),
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_formats_load_as_rgb(tmp_path, fmt):
    # A flat colour survives every format (GIF palettes and JPEG/WebP blocks keep it close).
    pixels = np.empty((24, 32, 3), np.uint8)
    pixels[:] = (10, 200, 30)
    path = tmp_path / f"picture.{fmt}"
    Image.fromarray(pixels).save(path)
    out = rgb(load_image(path))
    assert out.shape == (24, 32, 3)
    assert np.abs(out.astype(int) - pixels).max() <= 6


@pytest.mark.parametrize("fmt", LOSSLESS)
def test_lossless_formats_keep_every_pixel(tmp_path, fmt):
    pixels = noise()
    path = tmp_path / f"noise.{fmt}"
    Image.fromarray(pixels).save(path)
    np.testing.assert_array_equal(rgb(load_image(str(path))), pixels)


# -- odd but valid pictures are converted --------------------------------------------------
def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = noise()[:, :, 0]
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    out = rgb(load_image(tmp_path / "g.png"))
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_rgba_is_composited_on_white(tmp_path):
    pixels = np.zeros((4, 4, 4), np.uint8)
    pixels[..., 0] = 200  # red-ish everywhere
    pixels[0, 0, 3] = 0  # fully transparent -> white
    pixels[1, 1, 3] = 255  # opaque -> its own colour
    pixels[2, 2, 3] = 128  # half -> half way to white
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    out = rgb(load_image(tmp_path / "a.png"))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[1, 1], [200, 0, 0])
    expected = 128 / 255 * np.array([200, 0, 0]) + (1 - 128 / 255) * 255
    assert np.abs(out[2, 2] - expected).max() <= 1


def test_la_is_composited_on_white(tmp_path):
    pixels = np.zeros((4, 4, 2), np.uint8)
    pixels[..., 0] = 40
    pixels[..., 1] = 255
    pixels[3, 3, 1] = 0
    Image.fromarray(pixels, "LA").save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    out = rgb(load_image(tmp_path / "la.png"))
    np.testing.assert_array_equal(out[0, 0], [40, 40, 40])
    np.testing.assert_array_equal(out[3, 3], [255, 255, 255])


def _palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0 = red, 1 = blue
    image.putpixel((1, 0), 1)
    if transparent:
        image.info["transparency"] = 1
    return image


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_images(tmp_path, transparent):
    _palette_image(transparent).save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = rgb(load_image(tmp_path / "p.png"))
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255] if transparent else [0, 0, 255])


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = rgb(load_image(tmp_path / "c.jpg"))
    # C=0, M=Y=full, K=0 is red.
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 3


def test_16_bit_png_keeps_the_16_bit_values_over_257(tmp_path):
    values = (np.arange(24 * 32).reshape(24, 32) * 85).astype(np.uint16)  # 0 .. 65195
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    out = rgb(load_image(tmp_path / "g16.png"))
    np.testing.assert_array_equal(out[:, :, 0], np.round(values / 257).astype(np.uint8))


def test_dark_16_bit_png_stays_dark(tmp_path):
    # All values <= 255 in a 16-bit file are nearly black, not a full-range 8-bit picture.
    values = np.full((8, 8), 255, np.uint16)
    values[0, 0] = 0
    Image.fromarray(values).save(tmp_path / "dark16.png")
    out = rgb(load_image(tmp_path / "dark16.png"))
    assert out.max() == 1  # 255 / 257 rounds to 1


def test_float_tiff(tmp_path):
    values = np.linspace(0, 1, 24 * 32, dtype=np.float32).reshape(24, 32)
    Image.fromarray(values, "F").save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    out = rgb(load_image(tmp_path / "f.tif"))
    np.testing.assert_array_equal(out[:, :, 1], np.round(values * 255).astype(np.uint8))


def test_one_bit(tmp_path):
    bits = np.eye(8, dtype=bool)
    Image.fromarray(bits).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    out = rgb(load_image(tmp_path / "b.png"))
    np.testing.assert_array_equal(out[:, :, 2], bits * 255)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(tmp_path / "a.gif").n_frames == 3
    np.testing.assert_array_equal(rgb(load_image(tmp_path / "a.gif"))[4, 4], [255, 0, 0])


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :16] = (0, 0, 255)  # blue left half
    pixels[:, 16:] = (255, 0, 0)  # red right half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = rgb(load_image(tmp_path / "r.jpg"))
    expected = np.rot90(pixels, k=-1)  # clockwise
    assert out.shape == expected.shape == (32, 16, 3)
    assert np.abs(out.astype(int) - expected).mean() < 4
    # Passing the opened PIL image gives the same upright picture.
    np.testing.assert_array_equal(rgb(load_image(Image.open(tmp_path / "r.jpg"))), out)


# -- other sources ---------------------------------------------------------------------------
def test_sample_chelsea_is_skimage_photo():
    from skimage import data

    np.testing.assert_array_equal(rgb(load_image("sample:chelsea")), data.chelsea())
    np.testing.assert_array_equal(rgb(cnnscan.sample_image("coffee")), data.coffee())


def test_grayscale_sample():
    from skimage import data

    out = rgb(load_image("sample:camera"))
    np.testing.assert_array_equal(out[:, :, 0], data.camera())


def test_unknown_sample_lists_the_samples():
    with pytest.raises(ImageError, match=r"unknown sample.*chelsea"):
        load_image("sample:dog")


def test_bytes_and_file_objects(tmp_path):
    pixels = noise()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    np.testing.assert_array_equal(rgb(load_image(buffer.getvalue())), pixels)
    np.testing.assert_array_equal(rgb(load_image(bytearray(buffer.getvalue()))), pixels)
    buffer.seek(0)
    np.testing.assert_array_equal(rgb(load_image(buffer)), pixels)
    (tmp_path / "n.png").write_bytes(buffer.getvalue())
    with open(tmp_path / "n.png", "rb") as handle:
        np.testing.assert_array_equal(rgb(load_image(handle)), pixels)


def test_arrays():
    pixels = noise()
    np.testing.assert_array_equal(rgb(load_image(pixels)), pixels)
    np.testing.assert_array_equal(rgb(load_image(pixels / 255.0)), pixels)
    np.testing.assert_array_equal(rgb(load_image(pixels.astype(np.float32))), pixels)
    np.testing.assert_array_equal(rgb(load_image(pixels[:, :, :1]))[:, :, 2], pixels[:, :, 0])
    sixteen = pixels.astype(np.uint16) * 257
    np.testing.assert_array_equal(rgb(load_image(sixteen)), pixels)
    rgba = np.concatenate([pixels, np.full((*pixels.shape[:2], 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(rgb(load_image(rgba)), pixels)


def test_result_is_a_copy_of_a_pil_input():
    original = Image.fromarray(noise())
    before = original.getpixel((0, 0))
    out = load_image(original)
    out.putpixel((0, 0), tuple(255 - v for v in before))
    assert original.getpixel((0, 0)) == before


# -- bad input -------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "nope.jpg")


def test_folder(tmp_path):
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a picture\n" * 20)
    with pytest.raises(ImageError, match="not an image"):
        load_image(tmp_path / "notes.jpg")


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_truncated_files(tmp_path, fmt):
    buffer = io.BytesIO()
    Image.fromarray(noise(64, 64)).save(buffer, format=fmt)
    data = buffer.getvalue()
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_image(path)
    with pytest.raises(ImageError, match="truncated"):
        load_image(Image.open(path))  # lazily opened by the user, decoded by us


def test_truncation_setting_of_pillow_is_not_changed(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` × `height` but holds no pixel data (nothing to allocate)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any image data is decoded."""

    def forbidden(self, *args, **kwargs):
        raise AssertionError("pixel data was decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", forbidden)


@pytest.mark.parametrize("size", [(10_000, 10_000), (20_000, 20_000)])
def test_decompression_bomb_is_refused_before_decoding(tmp_path, no_decoding, size):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(*size))
    with pytest.raises(ImageError, match=r"too large|MP"):
        load_image(path)
    with pytest.raises(ImageError, match=r"too large|MP"):
        load_image(path.read_bytes())


def test_max_pixels_is_checked_before_decoding(tmp_path, no_decoding):
    Image.fromarray(noise(24, 32)).save(tmp_path / "small.png")
    with pytest.raises(ImageError, match=r"24×32|32×24") as info:
        load_image(tmp_path / "small.png", max_pixels=100)
    assert "max_pixels" in str(info.value)


def test_max_pixels_applies_to_arrays_and_pil_images():
    with pytest.raises(ImageError, match="limit"):
        load_image(noise(24, 32), max_pixels=100)
    with pytest.raises(ImageError, match="limit"):
        load_image(Image.fromarray(noise(24, 32)), max_pixels=100)
    assert load_image(noise(24, 32), max_pixels=24 * 32).size == (32, 24)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((1, 24, 32, 3), np.uint8), "shape"),
        (np.zeros((24, 32, 5), np.uint8), "shape"),
        (np.zeros((24,), np.uint8), "shape"),
        (np.zeros((0, 32, 3), np.uint8), "no pixels"),
        (np.full((8, 8, 3), np.nan), "NaN"),
        (np.full((8, 8, 3), np.inf, np.float32), "Inf"),
        (np.zeros((3, 24, 32), np.uint8), "channels-first"),
        (np.zeros((3, 24, 32), np.float32), "channels-first"),
        (np.full((8, 8, 3), -0.5), "float values"),  # a normalized tensor, not a picture
        (np.full((8, 8, 3), 70000, np.int64), "outside"),
        (np.full((8, 8, 3), 1 + 2j), "unsupported"),
    ],
)
def test_bad_arrays(array, match):
    with pytest.raises(ImageError, match=match):
        load_image(array)


def test_unsupported_source_type():
    with pytest.raises(ImageError, match="pass a path"):
        load_image(42)


def test_image_error_is_a_value_error_and_cnnscan_error():
    with pytest.raises(ValueError):
        load_image(np.zeros((3,)))
    with pytest.raises(cnnscan.CnnscanError):
        load_image(np.zeros((3,)))
