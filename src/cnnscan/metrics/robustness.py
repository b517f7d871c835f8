"""Max- and avg-sensitivity (Yeh et al. 2019, arXiv:1901.09392): the largest and the mean
change of the map when the input moves a little, relative to the map,

    max_s / mean_s ‖R(x + δ_s) − R(x)‖ / ‖R(x)‖,   δ_s ~ U(−r, r) per input value,
    r = noise_level · span,

with R the relevance reduction every metric uses, ‖·‖ the Frobenius norm, span the input's
max − min and the noise seeded (a CPU generator, so every device draws the same δ). The
method is re-run on the noisy copies in batches of a fixed size, with the original's layer and the
options given; both metrics read the same re-runs (computed once per call). An all-zero
original map makes the ratio undefined: NaN. captum's `sensitivity_max` with the same δ gives
the same maxima.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cnnscan.attribution import Attribution
from cnnscan.errors import MetricError
from cnnscan.methods import get_method, run_method
from cnnscan.methods.options import generator
from cnnscan.metrics.registry import MetricContext, register_metric
from cnnscan.metrics.relevance import relevance
from cnnscan.metrics.sanity import method_layer
from cnnscan.scan import Scan


def sensitivity(
    scan: Scan,
    attrs: Mapping[str, Attribution],
    originals: Mapping[str, torch.Tensor],
    *,
    n_samples: int = 10,
    noise_level: float = 0.02,
    options: Mapping[str, dict[str, Any]] | None = None,
    reduce: str = "abs",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Per attribution: the relative change of the map for every draw, (N, T, n_samples)
    (see module doc)."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise MetricError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if not isinstance(noise_level, int | float) or not 0 < noise_level < float("inf"):
        raise MetricError(f"noise_level must be a number > 0, got {noise_level!r}")
    inputs = scan.inputs
    n = len(inputs)
    span = (inputs.amax(dim=(1, 2, 3)) - inputs.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)
    noise = torch.rand((n_samples, *inputs.shape[1:]), generator=generator(seed)) * 2 - 1
    noise = noise.to(inputs)
    image = torch.arange(n, device=inputs.device).repeat_interleave(n_samples)
    sample = torch.arange(n_samples, device=inputs.device).repeat(n)
    noisy = inputs[image] + noise_level * span[image] * noise[sample]
    ratios = {}
    for name, attr in attrs.items():
        info = get_method(attr.method)
        targets = attr.targets.repeat_interleave(n_samples, dim=0)
        layer = method_layer(info, attr)
        changes = []
        key = ("max_sensitivity", info.name, tuple(inputs.shape[1:]), targets.shape[1])
        for rows in scan.batches(len(noisy), key):
            sub = scan.derive(noisy[rows], relu_rules=info.relu_rules)
            again = relevance(
                run_method(sub, info, targets[rows], layer, (options or {}).get(name)), reduce
            )
            diff = again - originals[name][image[rows]]
            changes.append(diff.flatten(2).norm(dim=2))
        change = torch.cat(changes).view(n, n_samples, -1).transpose(1, 2)
        size = originals[name].flatten(2).norm(dim=2).unsqueeze(2)
        ratios[name] = torch.where(size > 0, change / size.clamp_min(1e-30), torch.nan).cpu()
    return ratios


def _shared_sensitivity(ctx: MetricContext) -> dict[str, torch.Tensor]:
    """The re-runs of one call, made once for max- and avg-sensitivity."""
    if "sensitivity" not in ctx.shared:
        ctx.shared["sensitivity"] = sensitivity(
            ctx.scan,
            ctx.attrs,
            ctx.rel,
            n_samples=ctx.n_samples,
            noise_level=ctx.noise_level,
            options=ctx.method_options,
            reduce=ctx.reduce,
            seed=ctx.seed,
        )
    return ctx.shared["sensitivity"]


@register_metric(
    "max_sensitivity",
    family="robustness",
    description="Largest relative change of the map when the input moves by uniform noise of "
    "noise_level × its span (n_samples draws).",
    higher_is_better=False,
    reruns_method=True,
    default=False,
    title="max-sens↓",
    cost="the method n_samples times",
    paper="Yeh et al. 2019, arXiv:1901.09392",
)
def max_sensitivity_metric(ctx: MetricContext) -> dict[str, dict[str, Any]]:
    ratios = _shared_sensitivity(ctx)
    return {name: {"max_sensitivity": ratios[name].amax(dim=2)} for name in ctx.names}


@register_metric(
    "avg_sensitivity",
    family="robustness",
    description="Mean relative change of the map when the input moves by uniform noise of "
    "noise_level × its span (the same n_samples draws as max-sensitivity).",
    higher_is_better=False,
    reruns_method=True,
    default=False,
    title="avg-sens↓",
    cost="the method n_samples times (shared with max_sensitivity)",
    paper="Yeh et al. 2019, arXiv:1901.09392",
)
def avg_sensitivity_metric(ctx: MetricContext) -> dict[str, dict[str, Any]]:
    ratios = _shared_sensitivity(ctx)
    return {name: {"avg_sensitivity": ratios[name].mean(dim=2)} for name in ctx.names}
