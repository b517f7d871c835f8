"""Where the page's model and picture come from: server settings, model choices and
weight files (state dicts only, never unpickled), sample photos and checked uploads."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from PIL import Image

import cnnscan
from cnnscan.errors import ImageError, ModelError
from cnnscan.images import sample_names
from cnnscan.models import DEFAULT_MODEL, Model

ENV_ALLOW_LOCAL_FILES = "CNNSCAN_APP_ALLOW_LOCAL_FILES"
ENV_MAX_UPLOAD_MB = "CNNSCAN_APP_MAX_UPLOAD_MB"
DEFAULT_MAX_UPLOAD_MB = 20
UPLOAD_TYPES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")
DEFAULT_SAMPLE = "chelsea"


@dataclass(frozen=True)
class AppConfig:
    """Server-side settings, fixed when the app starts (`cnnscan app` sets them)."""

    allow_local_files: bool = False  # weights files on the server may be named in the page
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> AppConfig:
        environ = os.environ if environ is None else environ
        allow = environ.get(ENV_ALLOW_LOCAL_FILES, "").strip().lower() in ("1", "true", "yes")
        try:
            limit = int(environ.get(ENV_MAX_UPLOAD_MB, DEFAULT_MAX_UPLOAD_MB))
        except ValueError:
            limit = DEFAULT_MAX_UPLOAD_MB
        return cls(allow_local_files=allow, max_upload_mb=max(1, limit))


# -- models ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelChoice:
    """A model as the page names it: an architecture and where its weights come from."""

    name: str = DEFAULT_MODEL
    weights: str = "imagenet"  # "imagenet" (bundled or downloaded), "random", or "file"
    path: str | None = None  # the weights file, with weights == "file"

    def key(self) -> str:
        """Identifies the weights for caches: a file counts with its size and time stamp."""
        if self.weights != "file" or self.path is None:
            return f"{self.name}|{self.weights}"
        stat = Path(self.path).stat()
        return f"{self.name}|file:{Path(self.path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


@cache
def model_names() -> list[str]:
    """The bundled default first, then every name `cnnscan.list_models()` gives (torchvision,
    timm if installed, Keras applications)."""
    return [DEFAULT_MODEL, *(n for n in cnnscan.list_models() if n != DEFAULT_MODEL)]


def weights_file(path: str, config: AppConfig) -> Path:
    """A server-side weights file the page may load: only with `--allow-local-files`, only
    an existing .pt/.pth/.safetensors file (read as a state dict, never unpickled)."""
    if not config.allow_local_files:
        raise ModelError(
            "local files are off: start the app with `cnnscan app --allow-local-files` to "
            "load weights from a file on the server"
        )
    file = Path(path.strip()).expanduser()
    if file.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ModelError(
            f"{file.name or path!r} is not a weights file; name a state dict "
            f"({', '.join(WEIGHT_SUFFIXES)})"
        )
    if not file.is_file():
        raise ModelError(f"no weights file at {file}")
    return file


def load_choice(choice: ModelChoice, config: AppConfig) -> Model:
    """Load the model the page asked for. Files load through `weights_file` as state dicts
    (`weights_only=True`); a pickled model is never loaded from the page."""
    if choice.weights == "file":
        weights: str | Path | None = weights_file(choice.path or "", config)
    elif choice.weights in ("imagenet", "random"):
        weights = "imagenet" if choice.weights == "imagenet" else None
    else:
        raise ModelError(f"unknown weights choice {choice.weights!r}")
    return cnnscan.load_model(choice.name, weights=weights)


# -- pictures -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceImage:
    """A decoded RGB image, what to call it, and a digest that identifies it in caches."""

    image: Image.Image = field(compare=False, hash=False)
    name: str
    digest: str


def sample_picture(name: str = DEFAULT_SAMPLE) -> SourceImage:
    if name not in sample_names():
        raise ImageError(f"unknown sample {name!r}; samples: {', '.join(sample_names())}")
    return SourceImage(cnnscan.sample_image(name), f"sample:{name}", f"sample:{name}")


def read_upload(name: str, data: bytes, max_mb: float) -> SourceImage:
    """Decode an uploaded file, or raise an ImageError that says what is wrong with it:
    another file type, over the size limit, not an image, truncated, too many pixels."""
    suffix = Path(name).suffix.lower().lstrip(".")
    if suffix not in UPLOAD_TYPES:
        raise ImageError(
            f"{name}: .{suffix or '?'} files are not accepted; upload a JPEG, PNG, WebP, "
            "BMP or TIFF picture"
        )
    if len(data) > max_mb * 2**20:
        raise ImageError(
            f"{name} is {len(data) / 2**20:.1f} MB, above the {max_mb:g} MB upload limit; "
            "upload a smaller file (or start the app with --max-upload-mb N)"
        )
    handle = io.BytesIO(data)
    handle.name = name  # error messages name the file
    image = cnnscan.load_image(handle)
    return SourceImage(image, name, hashlib.sha256(data).hexdigest())
