"""Completeness: how well a map adds up to the score change it explains, as the method
itself reports it (Integrated Gradients' Σ attribution − (f(x) − f(x′)), LRP's conservation
error), relative to the explained score. Methods that make no such promise report nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from cnnscan.attribution import Attribution
from cnnscan.metrics.registry import MetricContext, register_metric

# Where methods report the error: these extras first, then any other `*_error_relative`
# extra of shape (N, T).
COMPLETENESS_KEYS = ("completeness_error_relative", "conservation_error_relative")
# Above this relative error a map is shown with a warning: it does not add up to the score
# change it explains (Integrated Gradients' usual check is a few percent).
COMPLETENESS_TOLERANCE = 0.05


def completeness_error(attr: Attribution) -> torch.Tensor | None:
    """The relative completeness / conservation error (N, T) the method reported, or None."""
    others = [key for key in attr.extras if key.endswith("_error_relative")]
    for key in dict.fromkeys([*COMPLETENESS_KEYS, *others]):
        value = attr.extras.get(key)
        if isinstance(value, torch.Tensor) and value.shape == attr.targets.shape:
            return value.double().cpu()
    return None


@register_metric(
    "completeness",
    family="completeness",
    description="The relative error the method reports between the sum of its map and the "
    "score change it explains (None when it makes no such promise).",
    higher_is_better=False,
    title="complete err↓",
    show=lambda v: "-" if v is None else f"{v:.2%}",
    cost="free",
    paper="Sundararajan et al. 2017, arXiv:1703.01365; Bach et al. 2015",
)
def completeness(ctx: MetricContext) -> dict[str, dict[str, Any]]:
    return {name: {"completeness": completeness_error(ctx.attrs[name])} for name in ctx.names}
