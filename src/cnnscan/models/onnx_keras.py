"""Models saved by other frameworks, as torch modules every method can explain: ONNX files
(through onnx2torch, the `cnnscan[onnx]` extra) and Keras 3 models (on Keras' torch
backend, the `cnnscan[keras]` extra).

Keras layers are torch modules, but `named_modules()` does not list them and they work
channels-last. `KerasModule` wraps a Keras model so that it takes (N, C, H, W) input like
any torch classifier and lists one submodule per Keras layer, named as in Keras; during a
forward each layer's output passes through its submodule channels-first, so hooks (layer
capture, CAM targets, the default layer) see (N, C, H, W) maps, and whatever a hook returns
flows on into the Keras graph.
"""

from __future__ import annotations

import contextvars
import os
import zipfile
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnscan.errors import ModelError
from cnnscan.models.model import wrap_module
from cnnscan.models.preprocessing import assumed, preset


# -- ONNX ----------------------------------------------------------------------------------------
def load_onnx(path: Path) -> Any:
    """An ONNX classifier converted to a torch.fx module, with its input size as preprocessing
    (the rest is not stored in ONNX files: the `imagenet` preset is assumed unless
    `load_model(..., preprocessing=)` says otherwise)."""

    try:
        import onnx
        from onnx2torch import convert
    except ImportError as e:
        raise ModelError("ONNX models need: pip install 'cnnscan[onnx]'") from e
    try:
        proto = onnx.load(str(path))
    except Exception as e:
        raise ModelError(f"{path} is not an ONNX model or is damaged ({_first_line(e)})") from e
    if not proto.graph.node:  # protobuf reads an empty (or near-empty) file as a blank model
        what = "is empty (0 bytes)" if path.stat().st_size == 0 else "holds no ONNX graph"
        raise ModelError(f"{path} {what}: not an ONNX model (export one with torch.onnx.export)")
    try:
        module = convert(proto)
    except KeyError as e:
        raise ModelError(
            f"onnx2torch cannot convert {path}: initializer {e} is shared through Identity "
            "nodes; export again with torch.onnx.export(..., do_constant_folding=False)"
        ) from e
    except Exception as e:
        raise ModelError(
            f"onnx2torch cannot convert {path} ({_first_line(e)}); opset 17 exports convert "
            "best: torch.onnx.export(..., dynamo=False, opset_version=17)"
        ) from e
    preprocessing = preset("imagenet", _onnx_size(proto), origin=assumed("an ONNX file"))
    return wrap_module(module.eval(), path.stem, preprocessing)


def _onnx_size(proto: Any) -> tuple[int, int]:
    """(H, W) of the first graph input when the file fixes them, else 224×224."""
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if inputs:
        dims = inputs[0].type.tensor_type.shape.dim
        if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[2:]):
            return dims[2].dim_value, dims[3].dim_value
    return 224, 224


# -- Keras ---------------------------------------------------------------------------------------
def _keras() -> Any:
    """The keras module on the torch backend (set before its first import)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as e:
        raise ModelError("Keras models need: pip install 'cnnscan[keras]'") from e
    if keras.backend.backend() != "torch":
        raise ModelError(
            f"Keras runs on its {keras.backend.backend()!r} backend; cnnscan needs the torch "
            "backend: set KERAS_BACKEND=torch before Python imports keras"
        )
    return keras


def is_keras(module: nn.Module) -> bool:
    """True for a Keras 3 layer or model (a torch module on Keras' torch backend)."""
    return any(c.__module__.startswith("keras.") for c in type(module).__mro__)


def load_keras(path: Path, *, trust_pickle: bool = False) -> Any:
    """A `.keras` file as a `KerasModule`. Lambda layers (Python code in the file) load only
    with `trust_pickle=True`. A final softmax is dropped from our copy: methods explain logits."""
    if not zipfile.is_zipfile(path):  # else Keras says "File not found" for any bad file
        what = "is empty (0 bytes)" if path.stat().st_size == 0 else "is not a zip archive"
        raise ModelError(
            f"{path} {what}: not a Keras model (a .keras file is the zip archive that "
            "model.save('model.keras') writes)"
        )
    keras = _keras()
    try:
        model = keras.saving.load_model(str(path), compile=False, safe_mode=not trust_pickle)
    except ValueError as e:
        if "safe_mode" in str(e) or "lambda" in str(e).lower():
            raise ModelError(
                f"{path} holds Python code (a Lambda layer); load it with trust_pickle=True "
                "(CLI: --trust-pickle) if you trust the file"
            ) from e
        raise ModelError(f"{path} is not a Keras model or is damaged ({_first_line(e)})") from e
    except Exception as e:
        raise ModelError(f"{path} is not a Keras model or is damaged ({_first_line(e)})") from e
    last = model.layers[-1] if getattr(model, "layers", None) else None
    if getattr(last, "activation", None) is keras.activations.softmax:
        last.activation = keras.activations.linear  # our own copy, loaded from the file
    return wrap_keras(model, path.stem)


def wrap_keras(model: nn.Module, name: str | None = None) -> Any:
    """A Keras model as a `Model`: NCHW input, layers as named submodules, input size from
    the model (the rest is not stored in Keras models: the `imagenet` preset is assumed
    unless `load_model(..., preprocessing=)` says otherwise)."""

    _keras()
    module = KerasModule(model)
    shape = tuple(getattr(model, "input_shape", None) or ())
    size = shape[1:3] if len(shape) == 4 and all(isinstance(d, int) for d in shape[1:3]) else None
    preprocessing = preset("imagenet", size or (224, 224), origin=assumed("a Keras model"))
    return wrap_module(module, name or model.name, preprocessing)


class _KerasLayer(nn.Module):
    """Stands for one Keras layer: its forward receives the layer's output and returns it
    channels-first (N, C, H, W), so hooks on this module see torch's layout. It holds the
    layer's own weights (the same tensors) so that layer tables count them."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer_type = type(layer).__name__
        if not getattr(layer, "layers", None):  # a nested model's weights belong to its layers
            for variable in layer.weights:
                if isinstance(variable.value, nn.Parameter):
                    name = variable.name.replace(".", "_").replace("/", "_")
                    if name not in self._parameters:
                        self.register_parameter(name, variable.value)

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        return output.permute(0, 3, 1, 2) if output.ndim == 4 else output


class _KerasDense(_KerasLayer):
    """A Keras Dense layer's stand-in, which also tells what it computes (for CAM)."""

    def __init__(self, layer: nn.Module):
        super().__init__(layer)
        self._layer = [layer]  # a list: not registered as a submodule, not copied twice

    def linear_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight (out, in), bias) of the Dense layer; None if it has an activation."""
        layer = self._layer[0]
        if layer.activation is not _keras().activations.linear:
            return None
        bias = layer.bias.value if layer.bias is not None else None
        return layer.kernel.value.T, bias


class KerasModule(nn.Module):
    """A Keras 3 classifier (torch backend) as a channels-first torch module: forward takes
    (N, C, H, W) and calls Keras in inference mode; one submodule per Keras layer, named as
    in Keras (a nested model's layers as `outer.inner`), carries that layer's output."""

    def __init__(self, keras_model: nn.Module):
        super().__init__()
        self.keras_model = keras_model
        # (position of the layer in `.layers`, recursively; dotted name of its submodule):
        # positions, not layer objects, so that a deep copy of this module routes its own.
        self._routes: list[tuple[tuple[int, ...], str]] = []
        self._add_layers(self, keras_model, (), "")

    def _add_layers(self, parent: nn.Module, model: Any, at: tuple[int, ...], prefix: str) -> None:
        keras = _keras()
        for i, layer in enumerate(model.layers):
            if isinstance(layer, keras.layers.InputLayer):
                continue
            name = layer.name.replace(".", "_")
            if hasattr(parent, name):  # e.g. a layer called "double" or "float"
                name = f"{name}_layer"
            dense = isinstance(layer, keras.layers.Dense) and len(layer.kernel.shape) == 2
            proxy = _KerasDense(layer) if dense else _KerasLayer(layer)
            parent.add_module(name, proxy)
            self._routes.append(((*at, i), prefix + name))
            if getattr(layer, "layers", None):
                self._add_layers(proxy, layer, (*at, i), f"{prefix}{name}.")

    def _layer(self, at: tuple[int, ...]) -> nn.Module:
        layer = self.keras_model
        for i in at:
            layer = layer.layers[i]
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        token = object()  # this call's hooks act in this call only (threads may share layers)
        handles = [
            self._layer(at).register_forward_hook(partial(_route, self.get_submodule(name), token))
            for at, name in self._routes
        ]
        active = _forwarding.set(token)
        try:
            return self.keras_model(x.permute(0, 2, 3, 1), training=False)
        finally:
            _forwarding.reset(active)
            for handle in handles:
                handle.remove()


_forwarding: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "cnnscan_keras_forward", default=None
)


def _route(proxy: _KerasLayer, token: object, _layer: nn.Module, _inputs: Any, output: Any) -> Any:
    """Pass a Keras layer's output through its proxy (channels-first) and back."""
    if _forwarding.get() is not token or not isinstance(output, torch.Tensor):
        return None
    routed = proxy(output)
    return routed.permute(0, 2, 3, 1) if output.ndim == 4 else routed


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
