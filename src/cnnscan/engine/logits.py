"""The logits in a model's output, checked: (N, classes), finite, not probabilities."""

from __future__ import annotations

import torch

from cnnscan.errors import ModelError


def logits_of(output: object) -> torch.Tensor:
    """The (N, classes) logits in a model's output, or a ModelError saying what came back."""
    if not isinstance(output, torch.Tensor):
        output = getattr(output, "logits", output)
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise ModelError(
            f"the model returned a {type(output).__name__}; cnnscan needs a tensor of logits "
            "(N, classes). Wrap the model so that forward returns the logits."
        )
    if output.ndim != 2:
        raise ModelError(
            f"the model returned shape {tuple(output.shape)}; cnnscan needs logits of shape "
            "(N, classes). Wrap the model so that forward returns them."
        )
    return output


def check_logits(logits: torch.Tensor) -> None:
    """Reject NaN/Inf and probability outputs, whose explanations would be meaningless."""
    finite = torch.isfinite(logits).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise ModelError(
            f"the model output contains NaN or Inf for image(s) {bad}; check the input "
            "normalization and the weights"
        )
    if logits.shape[1] > 1 and bool((logits >= 0).all()):
        sums = logits.detach().sum(dim=1)
        if bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-4)):
            raise ModelError(
                "the model returns probabilities (each row sums to 1), not logits; remove the "
                "final softmax so that explanations are not flattened by saturation"
            )
