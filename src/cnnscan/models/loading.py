"""`load_model`: a classifier by name, from a file, or around a module, with how it wants
its pixels and what its outputs are called."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from cnnscan.errors import ModelError
from cnnscan.models import onnx_keras, zoo
from cnnscan.models.bundled import DEFAULT_ALIASES, load_default
from cnnscan.models.labels import resolve_labels
from cnnscan.models.model import Model, wrap_module
from cnnscan.models.preprocessing import Preprocessing, parse_preprocessing
from cnnscan.models.weights import load_pickled_model
from cnnscan.paths import file_problem

ModelLike = Model | nn.Module | str | None


def as_model(model: ModelLike) -> Model:
    """A `Model` as it is, anything else through `load_model` (None: the bundled default)."""
    return model if isinstance(model, Model) else load_model(model)


def load_model(
    source: str | Path | nn.Module | Model | None = None,
    *,
    weights: str | Path | None = "imagenet",
    labels: str | Path | list[str] | None = None,
    preprocessing: Preprocessing | str | None = None,
    device: torch.device | str | None = None,
    trust_pickle: bool = False,
) -> Model:
    """Load a classifier by name, from a file, or wrap a module.

    `source`: None (the bundled EfficientNet-Lite0 with ImageNet weights), a name from
    `list_models()` (torchvision, timm, Keras-applications names), an `nn.Module` (a Keras 3
    model too), an `.onnx` or `.keras` file, or a pickled full model file (only with
    `trust_pickle=True`).
    `weights`: "imagenet" (bundled, cached or downloaded), None (random init), or a
    state-dict file (.pt/.pth loaded with `weights_only=True`, or .safetensors).
    `preprocessing`: how the model wants its pixels, where the source does not say it (ONNX
    and Keras files, modules) or to override it: a `Preprocessing`, or text for
    `parse_preprocessing` at the model's input size ("inception", "imagenet,size=299", …).
    """
    if isinstance(source, Model):
        model = source
    elif isinstance(source, nn.Module) and onnx_keras.is_keras(source):
        model = onnx_keras.wrap_keras(source)
    elif isinstance(source, nn.Module):
        if isinstance(preprocessing, str):  # at 224 px or its size=: the module cannot say
            preprocessing = parse_preprocessing(preprocessing)
        model = wrap_module(source, type(source).__name__, preprocessing)
    elif source is None or str(source).lower() in DEFAULT_ALIASES:
        model = load_default(weights)
    elif isinstance(source, str | Path) and _looks_like_file(source):
        path = Path(source)
        if weights not in ("imagenet", None):
            raise ModelError(
                f"weights={str(weights)!r} applies to a named architecture; the model file "
                f"{path.name} carries its own weights (use load_model('ARCH', weights=path))"
            )
        if (problem := file_problem(path, "model")) is not None:
            raise ModelError(
                f"{problem}. For weights of a named architecture use "
                "load_model('ARCH', weights=path)."
            )
        if path.suffix == ".safetensors":
            raise ModelError(
                f"{path} holds weights only; pass the architecture and the file: "
                "load_model('ARCH', weights=path) (CLI: --model ARCH --weights PATH)"
            )
        if path.suffix.lower() == ".onnx":
            model = onnx_keras.load_onnx(path)
        elif path.suffix.lower() == ".keras":
            model = onnx_keras.load_keras(path, trust_pickle=trust_pickle)
        else:
            model = wrap_module(load_pickled_model(path, trust_pickle), name=path.stem)
    elif isinstance(source, str | Path):
        model = zoo.load_named(str(source), weights)
    else:
        raise ModelError(
            f"cannot make a model from a {type(source).__name__}; pass a model name, a file, "
            "an nn.Module or nothing (the bundled default)"
        )
    if labels is not None:
        model = replace(model, labels=resolve_labels(labels, model.num_classes))
    if isinstance(preprocessing, str):
        preprocessing = parse_preprocessing(preprocessing, model.preprocessing.size)
    if preprocessing is not None:
        given = preprocessing if preprocessing.origin else replace(preprocessing, origin="given")
        model = replace(model, preprocessing=given)
    if device is not None:
        try:
            model.module.to(device)
        except (RuntimeError, AssertionError, ValueError) as e:
            raise ModelError(f"cannot move the model to device {device!r}: {e}") from e
    return model


_MODEL_FILE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".safetensors", ".onnx", ".keras"}


def _looks_like_file(source: str | Path) -> bool:
    path = Path(source)
    return isinstance(source, Path) or path.suffix in _MODEL_FILE_SUFFIXES or path.exists()
