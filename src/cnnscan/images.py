"""`load_image`: any picture a user has -> a validated 8-bit RGB PIL image.

The only module that decodes image files. Odd-but-valid pictures are converted, not
rejected: grayscale, palette, CMYK, 16-bit and float images become RGB; transparency is
composited on white; EXIF rotation is applied; animations give their first frame. Unusable
input (missing, truncated, not an image, empty, bigger than `max_pixels`) raises an
`ImageError` that names the problem and the fix.
"""

from __future__ import annotations

import io
import os
import warnings
from functools import cache
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnscan.errors import ImageError
from cnnscan.paths import file_problem

MAX_PIXELS = 90_000_000  # larger pictures are refused (decompression bombs, memory)
SAMPLE_PREFIX = "sample:"

# scikit-image's bundled photos (no download needed) and the function that returns each.
_SAMPLES = {
    "chelsea": "chelsea",
    "cat": "chelsea",
    "coffee": "coffee",
    "astronaut": "astronaut",
    "rocket": "rocket",
    "hubble": "hubble_deep_field",
    "immunohistochemistry": "immunohistochemistry",
    "camera": "camera",
    "coins": "coins",
}

ImageLike = str | os.PathLike | Image.Image | np.ndarray | bytes | IO[bytes]


def sample_names() -> list[str]:
    """Names accepted by `sample_image` and by `load_image("sample:NAME")`."""
    return sorted(_SAMPLES)


@cache
def _sample_pixels(name: str) -> np.ndarray:
    from skimage import data

    return getattr(data, _SAMPLES[name])()


def sample_image(name: str = "chelsea") -> Image.Image:
    """A real photo bundled with scikit-image (chelsea is a cat, coffee an espresso cup...)."""
    key = name.lower().removeprefix(SAMPLE_PREFIX)
    if key not in _SAMPLES:
        raise ImageError(f"unknown sample {name!r}; samples: {', '.join(sample_names())}")
    return _from_array(_sample_pixels(key), f"sample {key}")


def load_image(source: ImageLike, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An RGB PIL image from a path, "sample:NAME", PIL image, array, bytes or binary file.

    Arrays may be (H, W), (H, W, 1|3|4): uint8, uint16 (16-bit), or float in [0, 1] or
    [0, 255]. Sizes are checked against `max_pixels` before anything is decoded.
    """
    if isinstance(source, Image.Image):
        return _from_pil(source, "the image", max_pixels)
    if isinstance(source, np.ndarray):
        return _from_array(source, "the array", max_pixels)
    if isinstance(source, bytes | bytearray):
        return _decode(io.BytesIO(source), "the uploaded bytes", max_pixels)
    if hasattr(source, "read"):
        return _decode(source, getattr(source, "name", "the file object"), max_pixels)
    if isinstance(source, str) and source.lower().startswith(SAMPLE_PREFIX):
        return sample_image(source)
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.is_dir():
            raise ImageError(f"{path} is a folder, not an image (use `cnnscan batch` for folders)")
        if (problem := file_problem(path, "image")) is not None:
            raise ImageError(problem)
        try:
            handle = path.open("rb")
        except OSError as e:
            raise ImageError(f"cannot open {path}: {e.strerror or e}") from e
        with handle:
            return _decode(handle, str(path), max_pixels)
    raise ImageError(
        f"cannot read an image from a {type(source).__name__}; pass a path, 'sample:NAME', "
        "a PIL image, an (H, W, 3) array or bytes"
    )


def _decode(handle: IO[bytes], where: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    if _is_empty(handle):
        raise ImageError(f"{where}: empty (0 bytes), no image in it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(handle)  # reads the header only
    except Image.DecompressionBombError as e:
        raise ImageError(f"{where} is too large to decode safely ({e}); resize it first") from e
    except UnidentifiedImageError as e:
        raise ImageError(
            f"{where} is not an image cnnscan can read (empty, corrupt or an unknown format); "
            "use JPEG, PNG, WebP, BMP, GIF or TIFF"
        ) from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"{where} is damaged and cannot be read ({e})") from e
    return _from_pil(image, where, max_pixels, first_frame=True)


def _is_empty(handle: IO[bytes]) -> bool:
    """True for a seekable stream with nothing left to read (the position is kept)."""
    try:
        position = handle.tell()
        empty = handle.seek(0, io.SEEK_END) == position
        handle.seek(position)
        return empty
    except (AttributeError, OSError, ValueError):
        return False


def _from_pil(
    image: Image.Image, where: str, max_pixels: int, first_frame: bool = False
) -> Image.Image:
    """Check the size before decoding, decode (first frame of an animation when read from a
    file), apply the EXIF orientation and convert to RGB."""
    _check_size(image.size, where, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if first_frame and getattr(image, "n_frames", 1) > 1:
                image.seek(0)
            image.load()
            rotated = ImageOps.exif_transpose(image) or image
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"{where} is damaged or truncated and cannot be decoded ({e})") from e
    _check_size(rotated.size, where, max_pixels)
    return _to_rgb(rotated, where)


def _check_size(size: tuple[int, int], where: str, max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"{where} has no pixels ({width}×{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"{where} is {width}×{height} = {_megapixels(width * height)}, above the "
            f"{_megapixels(max_pixels)} limit; resize it first or pass max_pixels= if you "
            "trust it"
        )


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.0f} MP" if pixels >= 10_000_000 else f"{pixels:,} pixels"


def _to_rgb(image: Image.Image, where: str) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _from_array(np.asarray(image), where, max_pixels=image.width * image.height)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa", "P"):  # palette may hold transparency
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"{where} uses colour mode {mode!r}, which cannot become RGB") from e


def _from_array(array: np.ndarray, where: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """(H, W), (H, W, 1|3|4) arrays of uint8, uint16, other ints or floats in [0, 1] -> RGB."""
    pixels = np.asarray(array)
    if pixels.ndim == 3 and pixels.shape[0] in (1, 3, 4) and pixels.shape[2] not in (1, 3, 4):
        raise ImageError(
            f"{where} looks channels-first {pixels.shape}; pass (H, W, C) or a preprocessed "
            "float tensor (N, 3, H, W)"
        )
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (1, 3, 4)):
        raise ImageError(f"{where} has shape {pixels.shape}; expected (H, W) or (H, W, 1|3|4)")
    _check_size((pixels.shape[1], pixels.shape[0]), where, max_pixels)
    pixels = _to_uint8(pixels, where)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2:
        return Image.fromarray(pixels, "L").convert("RGB")
    if pixels.shape[2] == 4:
        return _to_rgb(Image.fromarray(np.ascontiguousarray(pixels), "RGBA"), where)
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def _to_uint8(pixels: np.ndarray, where: str) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == bool:
        return pixels.astype(np.uint8) * 255
    if np.issubdtype(pixels.dtype, np.floating):
        if not np.isfinite(pixels).all():
            raise ImageError(f"{where} contains NaN or Inf values")
        low, high = float(pixels.min(initial=0)), float(pixels.max(initial=0))
        if low < -1e-3 or high > 255.0:
            raise ImageError(
                f"{where} has float values from {low:.3g} to {high:.3g}; pictures need values "
                "in [0, 1] or [0, 255] (pass a normalized model input as a torch tensor instead)"
            )
        scale = 255.0 if high > 1.0 else 1.0
        return (np.clip(pixels / scale, 0, 1) * 255).round().astype(np.uint8)
    if np.issubdtype(pixels.dtype, np.integer):
        if pixels.min(initial=0) < 0 or pixels.max(initial=0) > 65535:
            raise ImageError(f"{where} has integer values outside 0..65535")
        # uint16 is 16-bit data whatever its values (a dark 16-bit scan stays dark); other
        # integer types (PIL's 32-bit "I" mode, int64 arrays) are 16-bit only above 255.
        sixteen = pixels.dtype == np.uint16 or pixels.max(initial=0) > 255
        return (pixels.astype(np.float64) / (257 if sixteen else 1)).round().astype(np.uint8)
    raise ImageError(f"{where} has unsupported pixel type {pixels.dtype}")
