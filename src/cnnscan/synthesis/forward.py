"""One forward for an objective: record the layers it reads and stop after the deepest.

Synthesis runs hundreds of forwards and backwards. When the objective reads a layer in
the middle of the network, the rest of the forward (and so of the backward) is wasted:
a hook raises once every layer the objective needs has run, and the activations recorded
so far are all the objective needs.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnscan.engine.logits import check_logits, logits_of
from cnnscan.layers import StopForward, capture, stop_after
from cnnscan.synthesis.objectives import Objective, Probe


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
                with stop_after(runner, refs, captured):
                    runner(seen)
            except StopForward:
                pass
    return Probe(model_input, captured, logits)
