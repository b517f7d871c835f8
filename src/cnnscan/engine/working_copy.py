"""Run a user's model without changing it.

Attribution needs eval mode, no parameter gradients and (on CPU) channels-last memory. We
never set those on the user's module: we run a private working copy that shares the
parameters' storage, rebuilt when the user's parameters change. A model that cannot be
copied is borrowed instead, under a lock, and every flag is put back afterwards.
"""

from __future__ import annotations

import copy
import itertools
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from cnnscan.engine.logits import check_logits, logits_of
from cnnscan.errors import ModelError

_copies: weakref.WeakKeyDictionary[nn.Module, _WorkingCopy] = weakref.WeakKeyDictionary()
_copies_lock = threading.Lock()
_borrow_locks: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()


@dataclass
class _WorkingCopy:
    module: nn.Module
    fingerprint: tuple
    device: torch.device


_SIMPLE = (bool, int, float, str, type(None))


def _fingerprint(module: nn.Module) -> tuple:
    """Changes when a parameter or buffer is replaced or modified in place, when a submodule
    is replaced (also a parameter-free one, e.g. an activation), or when a plain setting of
    a submodule changes (e.g. `negative_slope`, `inplace`, a flag read by `forward`)."""
    tensors = tuple(
        (id(t), t.data_ptr(), t._version) for t in (*module.parameters(), *module.buffers())
    )
    structure = tuple(
        (
            name,
            id(sub),
            tuple(
                (key, value)
                for key, value in vars(sub).items()
                if isinstance(value, _SIMPLE) and key != "training"
            ),
        )
        for name, sub in module.named_modules()
    )
    return tensors, structure


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _prepare(module: nn.Module, device: torch.device) -> nn.Module:
    """A copy in eval mode whose parameters share storage but need no gradient."""
    memo = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in module.parameters()}
    clone = copy.deepcopy(module, memo)
    clone.eval().to(device)
    if device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in clone.modules()):
        # channels-last runs forward+backward faster on CPU (docs/measurements.md)
        clone.to(memory_format=torch.channels_last)
    return clone


@contextmanager
def runnable(module: nn.Module, device: torch.device | str | None = None) -> Iterator[nn.Module]:
    """Yield a module ready for attribution (eval, no parameter grads) that computes what
    `module` computes; the user's module is left exactly as it was."""
    device = torch.device(device) if device is not None else _device_of(module)
    key = _fingerprint(module)
    with _copies_lock:
        cached = _copies.get(module)
        if cached is None or cached.fingerprint != key or cached.device != device:
            try:
                cached = _WorkingCopy(_prepare(module, device), key, device)
            except (TypeError, copy.Error, RuntimeError, AttributeError):
                cached = None
            if cached is not None:
                _copies[module] = cached
    if cached is not None:
        yield cached.module
        return
    if device != _device_of(module):
        raise ModelError(
            f"this model cannot be copied, so it runs where it is ({_device_of(module)}); "
            f"move it to {device} yourself or leave device unset"
        )
    with _borrowed(module) as borrowed:
        yield borrowed


@contextmanager
def _borrowed(module: nn.Module) -> Iterator[nn.Module]:
    """Use the user's own module in eval mode with frozen parameters, restoring every flag."""
    with _copies_lock:
        lock = _borrow_locks.setdefault(module, threading.RLock())
    with lock:
        modes = [(m, m.training) for m in module.modules()]
        grads = [(p, p.requires_grad) for p in module.parameters()]
        try:
            module.eval()
            for p, _ in grads:
                p.requires_grad_(False)
            yield module
        finally:
            for m, training in modes:
                m.training = training
            for p, requires_grad in grads:
                p.requires_grad_(requires_grad)


def forward_logits(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One checked forward without gradients: (N, classes) logits."""
    with runnable(module, x.device) as runner, torch.no_grad():
        logits = logits_of(runner(x))
    check_logits(logits)
    return logits


def memory_format_of(module: nn.Module) -> torch.memory_format:
    """The memory format of the module's 4-D weights (channels-last in CPU working copies),
    for inputs to match; read from the tensors, so folded copies whose convolutions became
    functional calls answer the same."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.ndim != 4:
            continue
        last = tensor.is_contiguous(memory_format=torch.channels_last)
        if last != tensor.is_contiguous():  # 1×1 or single-channel weights are both
            return torch.channels_last if last else torch.contiguous_format
    return torch.contiguous_format
