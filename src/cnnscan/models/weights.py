"""Weights and whole models from files, safely: state dicts with `weights_only=True`,
safetensors, and pickled full models only with the caller's explicit consent."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnscan.errors import ModelError
from cnnscan.paths import file_problem


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load a state dict: `.pt/.pth` (weights_only, never arbitrary pickle) or `.safetensors`."""
    path = Path(path)
    if (problem := file_problem(path, "weights")) is not None:
        raise ModelError(problem)
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


def load_pickled_model(path: Path, trust_pickle: bool) -> nn.Module:
    """A whole model pickled with `torch.save(model)`: unpickled only with `trust_pickle`
    (unpickling runs code from the file); otherwise an error that says what the file holds."""
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
