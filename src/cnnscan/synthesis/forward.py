"""One forward for an objective: record the layers it reads and stop after the deepest.

Synthesis runs hundreds of forwards and backwards. When the objective reads a layer in
the middle of the network, the rest of the forward (and so of the backward) is wasted:
a hook raises once every layer the objective needs has run, and the activations recorded
so far are all the objective needs.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from cnnscan.engine.logits import check_logits, logits_of
from cnnscan.layers import Capture, LayerRef, capture, get_module
from cnnscan.synthesis.objectives import Objective, Probe

_stopping: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "cnnscan_synthesis_stop", default=None
)


class _Stop(Exception):
    """Raised inside the forward once the objective has what it needs."""


@contextmanager
def _stop_after(runner: nn.Module, refs: tuple[LayerRef, ...], captured: Capture) -> Iterator[None]:
    """Within the block, a forward of `runner` raises `_Stop` as soon as every call named
    in `refs` has been recorded in `captured` (hooks removed on exit, also on errors)."""
    token = object()

    def done() -> bool:
        return all(len(captured.outputs(ref.name)) > (ref.call or 0) for ref in refs)

    def hook(_module, _inputs, _output):
        if _stopping.get() is token and done():
            raise _Stop

    handles = [
        get_module(runner, name).register_forward_hook(hook)
        for name in dict.fromkeys(ref.name for ref in refs)
    ]
    reset = _stopping.set(token)
    try:
        yield
    finally:
        _stopping.reset(reset)
        for handle in handles:
            handle.remove()


def probe(
    runner: nn.Module,
    objective: Objective,
    seen: torch.Tensor,
    model_input: torch.Tensor,
    *,
    stop_early: bool = True,
) -> Probe:
    """Run `runner` on `seen` (the transformed model input) and collect what `objective`
    reads; `model_input` is the untransformed input that penalties look at. Without
    `stop_early` the whole network runs (the first forward, which validates)."""
    refs = objective.layers
    if not refs and not objective.logits:
        return Probe(model_input)  # penalties only: no forward needed
    logits = None
    with capture(runner, list(refs)) as captured:
        if objective.logits:
            logits = logits_of(runner(seen))
            if not stop_early:
                check_logits(logits)
        elif not stop_early:
            runner(seen)
        else:
            try:
                with _stop_after(runner, refs, captured):
                    runner(seen)
            except _Stop:
                pass
    return Probe(model_input, captured, logits)
