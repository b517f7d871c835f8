"""Models by name: torchvision's classifiers, timm's (the optional `cnnscan[timm]` extra) and
the 26 tf.keras.applications names mapped to their equivalents. Preprocessing and labels
come from each library's own weight metadata; missing weights fail in seconds when offline.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import os
import socket
import threading
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from cnnscan.errors import ModelError
from cnnscan.models.bundled import DEFAULT_MODEL
from cnnscan.models.model import wrap_module
from cnnscan.models.preprocessing import Preprocessing
from cnnscan.models.weights import load_weights

TIMM_PREFIX = "timm:"
TORCHVISION_PREFIX = "torchvision:"
PROBE_SECONDS = 3.0  # how long a download host may take to answer before we call it offline

# tf.keras.applications name -> (candidates, first available wins; how close the match is).
KERAS_APPLICATIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "Xception": (("timm:legacy_xception",), "exact (timm's weights are ported from Keras)"),
    "VGG16": (("vgg16",), "exact architecture"),
    "VGG19": (("vgg19",), "exact architecture"),
    "ResNet50": (("resnet50",), "close: ResNet v1.5 (stride in the 3×3 conv, Keras: in the 1×1)"),
    "ResNet101": (("resnet101",), "close: ResNet v1.5, as ResNet50"),
    "ResNet152": (("resnet152",), "close: ResNet v1.5, as ResNet50"),
    "ResNet50V2": (("timm:resnetv2_50",), "close: pre-activation ResNet, stride placement differs"),
    "ResNet101V2": (("timm:resnetv2_101",), "close: as ResNet50V2"),
    "ResNet152V2": (("timm:resnetv2_152",), "close: as ResNet50V2"),
    "InceptionV3": (("inception_v3",), "exact architecture (torchvision's weights come from TF)"),
    "InceptionResNetV2": (("timm:inception_resnet_v2",), "exact (weights ported from TF)"),
    "MobileNet": (("timm:mobilenetv1_100",), "exact architecture (α = 1.0)"),
    "MobileNetV2": (("mobilenet_v2",), "exact architecture (α = 1.0)"),
    "MobileNetV3Small": (("mobilenet_v3_small",), "exact architecture"),
    "MobileNetV3Large": (("mobilenet_v3_large",), "exact architecture"),
    "DenseNet121": (("densenet121",), "exact architecture"),
    "DenseNet169": (("densenet169",), "exact architecture"),
    "DenseNet201": (("densenet201",), "exact architecture"),
    "NASNetMobile": ((), "none: neither torchvision nor timm has NASNet-A Mobile"),
    "NASNetLarge": (("timm:nasnetalarge",), "exact (weights ported from TF)"),
    **{
        f"EfficientNetB{i}": (
            (f"timm:tf_efficientnet_b{i}", f"efficientnet_b{i}"),
            "exact with timm (TF 'same' padding, TF weights); torchvision's pads symmetrically",
        )
        for i in range(8)
    },
}


# -- names ---------------------------------------------------------------------------------------
def torchvision_names() -> list[str]:
    """Every torchvision image-classification model name."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def timm_names() -> list[str]:
    """Every timm architecture name ([] without timm)."""
    if not timm_available():
        return []
    import timm

    return timm.list_models()


def list_models(pattern: str = "*") -> list[str]:
    """Names `load_model` accepts that match the shell-style `pattern` (case-insensitive):
    the bundled default, torchvision's classifiers, timm's architectures (if installed; as
    `timm:NAME` where torchvision has the same name) and the Keras-applications names."""

    torchvision = torchvision_names()
    taken = set(torchvision)
    timm = [f"{TIMM_PREFIX}{n}" if n in taken else n for n in timm_names()]
    names = [DEFAULT_MODEL, *torchvision, *timm, *KERAS_APPLICATIONS]
    wanted = pattern.lower()
    chosen = (n for n in dict.fromkeys(names) if fnmatch.fnmatchcase(n.lower(), wanted))
    return sorted(chosen, key=str.lower)


def load_named(name: str, weights: str | Path | None) -> Any:
    """A `Model` for a torchvision, timm or Keras-applications name."""
    key = name.strip()
    lowered = key.lower().replace("-", "_")
    if lowered.startswith(TORCHVISION_PREFIX):
        return _torchvision(lowered.removeprefix(TORCHVISION_PREFIX), weights)
    if lowered.startswith(TIMM_PREFIX):
        return _timm(key[len(TIMM_PREFIX) :], weights)
    if lowered in torchvision_names():
        return _torchvision(lowered, weights)
    keras = {k.lower(): k for k in KERAS_APPLICATIONS}
    if key.lower() in keras:
        return _keras_application(keras[key.lower()], weights)
    if timm_available():
        import timm

        if timm.is_model(key):
            return _timm(key, weights)
    raise ModelError(_unknown(key))


def _unknown(name: str) -> str:
    """The error for an unknown name: the ≤ 5 closest architectures, each named once (a Keras
    name, its torchvision or timm equivalent and `timm:NAME` are one architecture), in the
    spelling closest to what was typed."""
    spellings: dict[str, list[str]] = {}
    for known in list_models():
        spellings.setdefault(_architecture(known), []).append(known)
    close = difflib.get_close_matches(name.lower(), list(spellings), n=5, cutoff=0.5)

    def likeness(spelling: str) -> float:
        return difflib.SequenceMatcher(None, name, spelling).ratio()

    suggestions = [max(spellings[key], key=likeness) for key in close]
    hint = f" Did you mean: {', '.join(suggestions)}?" if close else ""
    extra = "" if timm_available() else " For timm's models: pip install 'cnnscan[timm]'."
    return (
        f"unknown model {name!r}.{hint} Use a name from cnnscan.list_models() (CLI: cnnscan "
        f"models), an nn.Module, or a file (.pt/.pth, .onnx, .keras).{extra}"
    )


def _architecture(name: str) -> str:
    """What a listed name loads, lower-case and without a library prefix (a Keras name: its
    first equivalent)."""
    candidates = KERAS_APPLICATIONS.get(name, ((),))[0]
    loaded = candidates[0] if candidates else name
    return loaded.lower().removeprefix(TIMM_PREFIX).removeprefix(TORCHVISION_PREFIX)


def keras_equivalent(name: str) -> str:
    """The name `load_model` uses for a tf.keras.applications name (e.g. "InceptionResNetV2"
    -> "timm:inception_resnet_v2"), or a ModelError saying why there is none here."""
    candidates, note = KERAS_APPLICATIONS[name]
    if not candidates:
        raise ModelError(
            f"{name} has no equivalent in torchvision or timm (and Keras cannot build it on "
            "the torch backend); the nearest are 'NASNetLarge' (same cell design, larger) and "
            "'mnasnet1_0', or export your Keras model to ONNX and load_model('model.onnx')"
        )
    usable = [c for c in candidates if not c.startswith(TIMM_PREFIX) or timm_available()]
    if not usable:
        raise ModelError(
            f"{name} maps to timm's {candidates[0].removeprefix(TIMM_PREFIX)} ({note}); "
            "install it with: pip install 'cnnscan[timm]'"
        )
    return usable[0]


def _keras_application(name: str, weights: str | Path | None) -> Any:
    model = load_named(keras_equivalent(name), weights)
    return replace(model, name=f"{name} ({model.name})")


# -- torchvision ---------------------------------------------------------------------------------
def _torchvision(name: str, weights: str | Path | None) -> Any:
    import torchvision

    if name not in torchvision_names():
        raise ModelError(_unknown(name))
    default_weights = torchvision.models.get_model_weights(name).DEFAULT
    if weights == "imagenet":
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(default_weights.url).name
        if not cached.is_file():
            _require_download(name, default_weights.url)
        try:
            module = torchvision.models.get_model(name, weights=default_weights)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            raise ModelError(_offline_message(name, default_weights.url, str(e))) from e
    else:
        module = torchvision.models.get_model(name, weights=None)
        if weights is not None:
            load_weights(module, weights)
    module.eval()
    model = wrap_module(module, name, torchvision_preprocessing(default_weights))
    categories = default_weights.meta.get("categories")
    if categories and len(categories) == model.num_classes:
        model = replace(model, labels=tuple(categories))
    return model


def torchvision_preprocessing(weights: Any) -> Preprocessing:
    """The eval transform of torchvision weights (`weights.transforms()`) as a Preprocessing."""
    transform = weights.transforms()
    return Preprocessing(
        size=(transform.crop_size[0],) * 2,
        resize_shorter=transform.resize_size[0],
        interpolation=transform.interpolation.value,
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        origin=f"torchvision's {weights}",
    )


# -- timm ----------------------------------------------------------------------------------------
def _timm(name: str, weights: str | Path | None) -> Any:

    if not timm_available():
        raise ModelError(f"{name!r} is a timm model; install timm: pip install 'cnnscan[timm]'")
    import timm

    if not timm.is_model(name):
        raise ModelError(_unknown(name))
    if weights == "imagenet":
        module = _timm_pretrained(timm, name)
    else:
        module = timm.create_model(name, pretrained=False)
        if weights is not None:
            load_weights(module, weights)
    module.eval()
    config = timm.data.resolve_model_data_config(module)
    model = wrap_module(module, name, timm_preprocessing(config))
    labels = _timm_labels(module, model.num_classes)
    return replace(model, labels=labels) if labels else model


def _timm_pretrained(timm: Any, name: str) -> nn.Module:
    """timm's default pretrained weights: from the local cache when there, else downloaded
    (only after a quick check that the host answers, so offline machines fail in seconds)."""
    config = timm.models.get_pretrained_cfg(name)
    if config is None or not (config.hf_hub_id or config.url or config.file):
        raise ModelError(
            f"timm has no pretrained weights for {name!r}; use weights=None (random) or "
            "weights=PATH, or pick a tagged name from timm.list_models(pretrained=True)"
        )
    cached = _timm_cached_file(config)
    source = f"https://huggingface.co/{config.hf_hub_id}" if config.hf_hub_id else config.url
    try:
        if cached is not None:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached})
        _require_download(name, source)
        return timm.create_model(name, pretrained=True)
    except ModelError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelError(_offline_message(name, source, str(e).splitlines()[0])) from e


def _timm_cached_file(config: Any) -> str | None:
    """The weight file of a timm pretrained config in the Hugging Face or torch hub cache."""
    if config.file and Path(config.file).is_file():
        return str(config.file)
    if config.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        names = [config.hf_hub_filename] if config.hf_hub_filename else []
        for filename in [*names, "model.safetensors", "pytorch_model.bin"]:
            path = try_to_load_from_cache(config.hf_hub_id, filename)
            if isinstance(path, str) and Path(path).is_file():
                return path
    if config.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(config.url).path).name
        if path.is_file():
            return str(path)
    return None


def timm_preprocessing(config: dict[str, Any]) -> Preprocessing:
    """timm's eval transform (`resolve_data_config`) as a Preprocessing: the resize is
    floor(size / crop_pct); "squash" resizes both sides, "center" the shorter one. ("border",
    used by a handful of weights, is approximated by "center".)"""
    _, height, width = config["input_size"]
    crop_pct = config.get("crop_pct") or 0.875  # timm's DEFAULT_CROP_PCT
    scaled = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    common = {
        "size": (height, width),
        "interpolation": config.get("interpolation") or "bilinear",
        "mean": tuple(config["mean"]),
        "std": tuple(config["std"]),
        "origin": "timm's pretrained config",
    }
    if config.get("crop_mode") == "squash" or height != width:
        return Preprocessing(resize_to=scaled, **common)
    return Preprocessing(resize_shorter=scaled[0], **common)


def _timm_labels(module: nn.Module, n: int) -> tuple[str, ...]:
    """Class names from the weights' metadata: the config's own names, or the ImageNet subset
    (1k, 22k...) timm infers, as short names ("tench", not "tench, Tinca tinca")."""
    import timm.data

    config = getattr(module, "pretrained_cfg", None) or {}
    names = config.get("label_descriptions") or config.get("label_names")
    if names and len(names) == n:
        return tuple(str(name) for name in names)
    subset = timm.data.infer_imagenet_subset(module)
    if not subset:
        return ()
    descriptions = timm.data.ImageNetInfo(subset).label_descriptions()
    if len(descriptions) != n:
        return ()
    return tuple(text.split(",")[0].strip() for text in descriptions)


# -- downloads -----------------------------------------------------------------------------------
def _require_download(name: str, url: str) -> None:
    """Raise a ModelError at once if the weights cannot be downloaded (offline)."""
    if not reachable(url):
        raise ModelError(_offline_message(name, url, "no network connection"))


def _offline_message(name: str, url: str, reason: str) -> str:
    return (
        f"ImageNet weights for {name!r} are not cached and could not be downloaded ({reason}). "
        f"Download {url} on a connected machine and pass weights=PATH (CLI: --weights PATH), "
        f"or copy torchvision/timm's cache ({Path(torch.hub.get_dir()) / 'checkpoints'}, "
        "the Hugging Face cache) here, or use weights=None for random weights."
    )


def reachable(url: str, timeout: float = PROBE_SECONDS) -> bool:
    """True if a TCP connection to the URL's host (or the configured proxy) opens within
    `timeout` seconds, DNS included; False at once with CNNSCAN_OFFLINE=1 or HF_HUB_OFFLINE=1."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in _OFFLINE_VARIABLES):
        return False
    parsed = urlparse(url)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    target = urlparse(proxy) if proxy else parsed
    if not target.hostname:
        return False
    port = target.port or (443 if target.scheme == "https" else 80)
    opened: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((target.hostname, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)  # bounds a slow DNS lookup too
    thread.start()
    thread.join(timeout)
    return bool(opened)


_OFFLINE_VARIABLES = ("CNNSCAN_OFFLINE", "HF_HUB_OFFLINE")
