"""No NaN or Inf leaves a method: a map (or unit score) that is not finite becomes an error
naming the layer where non-finite values first appear, instead of a picture of NaNs.

The logits are checked by the scan, so a non-finite map means the model computes NaN/Inf
somewhere its logits ignore (a dead channel, a broken weight) and the method read it (CAMs
weigh every channel), or the method's own arithmetic overflowed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cnnscan.errors import MethodError, ModelError
from cnnscan.layers import first_nonfinite
from cnnscan.scan import match_format

if TYPE_CHECKING:
    from cnnscan.methods.registry import MethodInfo, MethodResult
    from cnnscan.scan import Scan


def check_finite(scan: Scan, info: MethodInfo, result: MethodResult) -> None:
    """Raise if the result's maps or scores hold NaN or ±Inf (see `nonfinite_error`)."""
    for what, values in (("map", result.maps), ("scores", result.scores)):
        if values is not None and not bool(torch.isfinite(values).all()):
            bad, total = int((~torch.isfinite(values)).sum()), values.numel()
            share = f"{bad / total:.0%}" if bad >= total / 100 else f"{bad} of {total} values"
            raise nonfinite_error(scan, info, f"its {what} is NaN/Inf ({share})")


def nonfinite_error(scan: Scan, info: MethodInfo, symptom: str) -> MethodError | ModelError:
    """The error for a method whose result is not finite (`symptom`: what was seen): a
    ModelError naming the first layer whose output is not finite, or a MethodError if
    every layer's output is (the method's own arithmetic)."""
    with scan.runner() as runner:
        found = first_nonfinite(runner, match_format(scan.inputs, runner))
    method = info.name
    if found is None:
        return MethodError(
            f"{method}: {symptom} although every layer's output is finite (its gradients or "
            "arithmetic overflow); try another method or layer"
        )
    layer, output = found
    bad = ~torch.isfinite(output)
    found_kinds = (("NaN", output.isnan()), ("Inf", output.isinf()))
    kinds = "/".join(kind for kind, hit in found_kinds if hit.any())
    where = ""
    if output.ndim >= 2:
        channels = bad.transpose(0, 1).flatten(1).any(dim=1).nonzero().flatten().tolist()
        shown = ", ".join(map(str, channels[:8])) + (", …" if len(channels) > 8 else "")
        where = f" in channel(s) {shown} of {output.shape[1]}"
    fix = f" or explain a layer before {layer!r}" if "layer" in info.options() else ""
    return ModelError(
        f"{method}: {symptom}: layer {layer!r} outputs {kinds}{where} (the logits are finite, "
        f"so they ignore these values, but {method} reads them); fix the model's weights{fix}"
    )
