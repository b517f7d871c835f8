"""A faster engine for forwards without gradients (deletion/insertion curves, Score-CAM,
perturbation methods, average drop, batch runs): the model exported to ONNX and run by ONNX
Runtime on the CPU, 2.5-3.4x faster per image than the BatchNorm-folded torch copy
(docs/measurements.md). The exported graph is cached on disk under a hash of the model's
class, weights and input shape, so a second process pays nothing; each engine is checked
against torch on the scan's own input and refused when the logits differ by more than
float32 rounding. Anything that cannot be exported, other devices and dtypes, or a missing
`onnxruntime` fall back to torch (`CNNSCAN_ENGINE=torch` forces that).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnscan.engine.logits import logits_of
from cnnscan.engine.working_copy import memory_format_of
from cnnscan.layers import capture

log = logging.getLogger("cnnscan.engine")

ENGINE_VARIABLE = "CNNSCAN_ENGINE"  # "torch" turns the ONNX Runtime engine off
CACHE_VARIABLE = "CNNSCAN_CACHE"  # where exported graphs are kept (default ~/.cache/cnnscan)
OPSET = 17

Forward = Callable[[torch.Tensor], torch.Tensor]

# One engine (or None: use torch) per user module and input shape, built once per process.
_engines: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Future]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def cache_dir() -> Path:
    """Where exported graphs are cached: $CNNSCAN_CACHE, else $XDG_CACHE_HOME/cnnscan or
    ~/.cache/cnnscan."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnnscan"


def available() -> bool:
    """True if ONNX Runtime can be used (installed, not turned off)."""
    if os.environ.get(ENGINE_VARIABLE, "").strip().lower() == "torch":
        return False
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class _Engine:
    """An ONNX Runtime session computing the logits (and, when exported with them, layer
    outputs) of (N, C, H, W) float32 CPU inputs."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Threads that spin while they wait slow every other job on the cores; the arena
        # keeps memory of the largest batch ever run (hundreds of MB): both off.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_cpu_mem_arena = False
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input = self.session.get_inputs()[0].name

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The logits, then each exported layer's output."""
        array = np.ascontiguousarray(x.detach().to(torch.float32).cpu().numpy())
        return [torch.from_numpy(out) for out in self.session.run(None, {self.input: array})]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x)[0]


class _WithLayers(nn.Module):
    """A working copy whose forward returns the logits and the outputs of `layers` (names,
    `name@k` for a call of a reused module), for export."""

    def __init__(self, runner: nn.Module, layers: tuple[str, ...]):
        super().__init__()
        self.runner, self.layers = runner, layers
        self.training = runner.training  # export restores this mode on every submodule

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with capture(self.runner, list(self.layers)) as captured:
            logits = logits_of(self.runner(x))
        return (logits, *(captured[layer] for layer in self.layers))


def model_key(module: nn.Module, shape: tuple[int, ...]) -> str:
    """A hash of what the exported graph depends on: the module's class, every parameter
    and buffer (names, shapes, bytes), the input shape and the torch version."""
    digest = hashlib.sha256()
    digest.update(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    digest.update(f"{shape}|{torch.__version__}|{OPSET}".encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:32]


class NotTraceable(Exception):
    """The forward reads values of tensors as Python numbers: the traced graph would keep
    the path one input took, not compute the model for every input."""


def export(runner: nn.Module, example: torch.Tensor, path: Path, outputs: int = 1) -> None:
    """Write `runner` (an eval-mode working copy returning `outputs` tensors: the logits,
    then layer outputs) as an ONNX graph with a free batch size, atomically (a half-written
    file is never read); NotTraceable if the trace may depend on the input's values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.part")
    names = ["logits", *(f"layer{i}" for i in range(outputs - 1))]
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always", torch.jit.TracerWarning)
        torch.onnx.export(
            runner,
            (example.contiguous(),),
            str(partial),
            dynamo=False,
            opset_version=OPSET,
            input_names=["x"],
            output_names=names,
            dynamic_axes={name: {0: "n"} for name in ["x", *names]},
            do_constant_folding=True,
        )
    traced = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if traced:
        partial.unlink(missing_ok=True)
        raise NotTraceable(str(traced[0].message).splitlines()[0])
    partial.replace(path)


def engine_for(
    module: nn.Module, runner: nn.Module, example: torch.Tensor, layers: tuple[str, ...] = ()
) -> _Engine | None:
    """The ONNX Runtime engine for `module`'s working copy `runner` at `example`'s shape,
    giving the logits and the outputs of `layers`, or None (use torch): not available,
    another device or dtype, not exportable, or its numbers differ from torch's beyond
    float32 rounding on `example` or on a second, different input. Built once per module,
    shape, layers and torch thread count (the session runs on as many threads); a caller
    that asks while another builds it waits."""
    if example.device.type != "cpu" or example.dtype != torch.float32 or not available():
        return None
    shape = tuple(example.shape[1:])
    key = (shape, tuple(layers), torch.get_num_threads())
    with _lock:
        known = _engines.setdefault(module, {})
        future = known.get(key)
        building = future is None
        if building:
            future = known[key] = Future()
    if building:
        future.set_result(_build(runner, example[:1], shape, tuple(layers)))
    return future.result()


def _build(
    runner: nn.Module, example: torch.Tensor, shape: tuple[int, ...], layers: tuple[str, ...]
) -> _Engine | None:
    exported = _WithLayers(runner, layers) if layers else runner
    suffix = hashlib.sha256("|".join(layers).encode()).hexdigest()[:8] if layers else ""
    path = cache_dir() / "onnx" / f"{model_key(runner, shape)}{suffix}.onnx"
    engine = None
    for attempt in ("cached", "exported"):
        try:
            if attempt == "exported" or not path.is_file():
                export(exported, example, path, 1 + len(layers))
                attempt = "exported"
            engine = _Engine(path, torch.get_num_threads())
            break
        except Exception as e:  # export or run failed: torch does the work instead
            if attempt == "cached":  # a damaged cache file: export again
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            log.info("ONNX Runtime not used (%s: %s); forwards run in torch", type(e).__name__, e)
            return None
    if engine is None:
        return None
    # The example and a copy in another regime of values and positions, one at a time and
    # together (a batch dimension fixed by mistake shows at two).
    other = torch.flip(-example, dims=(-1,))
    for x in (example, other, torch.cat([example, other])):
        with torch.no_grad():
            expected = _as_tuple(exported(x.contiguous(memory_format=memory_format_of(runner))))
        try:
            got = engine.outputs(x)
        except Exception as e:
            log.info("ONNX Runtime failed (%s: %s); forwards run in torch", type(e).__name__, e)
            return None
        for ours, theirs in zip(got, expected, strict=True):
            theirs = theirs.detach().to(torch.float32).cpu()
            if ours.shape != theirs.shape or not agrees(ours, theirs):
                log.info("ONNX Runtime's numbers differ from torch's beyond rounding; torch runs")
                return None
    return engine


def _as_tuple(output: object) -> tuple[torch.Tensor, ...]:
    return output if isinstance(output, tuple) else (logits_of(output),)


def agrees(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Logits equal within float32 rounding of a deep network: 1e-4 of their range."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return bool(torch.allclose(got, expected, rtol=0, atol=1e-4 * max(scale, 1.0)))
