"""Removal-based faithfulness as quantus 0.6 computes it, on the relevance every metric reads.

- ROAD (Rong et al. 2022, arXiv:2202.00449), most relevant first: for the percentages
  (k + ½)/steps, k = 0..steps − 1 (steps = 50: quantus' 1 %, 3 %, …, 99 %), the top
  ⌊H·W·p⌋ pixels are removed by noisy linear imputation (`cnnscan.metrics.imputation`,
  noise σ = noise_level × the input's span, seeded per percentage: a map scores alike alone
  or in any batch) and the curve
  says whether the model still predicts the target (1) or not (0). The score is the curve's
  mean, the accuracy over the percentages: lower is better (the map found what the
  prediction needs). quantus returns each percentage's accuracy over a batch of images:
  the mean of these curves.
- Sensitivity-n (Ancona et al. 2018, arXiv:1711.06104, in quantus' variant): pixels are
  removed most relevant first in `steps` equal steps (replaced by the substrate, zeros by
  default: the deletion curve's pass); for every step n whose count stays within 80 % of
  the pixels, the Pearson correlation over the maps of one attribution (its images and
  targets) between the drop of the target's probability after n steps and the relevance
  removed in step n. quantus correlates the relevance of the step (not of every pixel
  removed so far, as the paper's random subsets do) across the images of a batch; so does
  this metric, and it is one number per attribution (the mean over n of the defined
  correlations), not per image: it needs several images or targets (NaN for one map).
"""

from __future__ import annotations

from typing import Any

import torch

from cnnscan.errors import MetricError
from cnnscan.methods.options import generator
from cnnscan.metrics.faithfulness import causal_curves, deletion_order
from cnnscan.metrics.imputation import impute
from cnnscan.metrics.registry import MetricContext, register_metric
from cnnscan.scan import Scan

MAX_SHARE = 0.8  # sensitivity-n: quantus' n_max_percentage


def road_counts(steps: int, pixels: int) -> torch.Tensor:
    """Pixels removed at each percentage (k + ½)/steps: ⌊pixels · (2k + 1) / (2 · steps)⌋."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= pixels:
        raise MetricError(f"steps must be an integer from 1 to {pixels} (pixels), got {steps!r}")
    k = torch.arange(steps, dtype=torch.long)
    return (2 * k + 1) * pixels // (2 * steps)


class _Imputed:
    """Row (map m, percentage k): image of map m with its top counts[k] pixels imputed."""

    def __init__(self, inputs, image, ranks, counts, sigma, seed):
        self.inputs, self.image, self.ranks, self.counts = inputs, image, ranks, counts
        self.sigma, self.seed = sigma, seed

    def __len__(self) -> int:
        return len(self.ranks) * len(self.counts)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        out = []
        for row in range(len(self))[rows]:
            m, k = divmod(row, len(self.counts))
            removed = self.ranks[m] < self.counts[k]
            x = self.inputs[self.image[m]]
            noise = None
            if self.sigma[m] > 0:
                size = (x.shape[0], int(removed.sum()))
                noise = torch.randn(size, generator=generator(self.seed + k)) * self.sigma[m]
            out.append(impute(x, removed, noise))
        return torch.stack(out)


def road_curves(
    scan: Scan,
    rel: torch.Tensor,
    image: torch.Tensor,
    target: torch.Tensor,
    *,
    steps: int = 50,
    noise_level: float = 0.02,
    seed: int = 0,
    progress=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(percentages (steps,), curves (M, steps) of 0/1: still predicted) for relevance maps
    `rel` (M, H, W) of images `image` (M,) and classes `target` (M,) (see module doc)."""
    m, h, w = rel.shape
    counts = road_counts(steps, h * w)
    if not isinstance(noise_level, int | float) or not 0 <= noise_level < float("inf"):
        raise MetricError(f"noise_level must be a number >= 0, got {noise_level!r}")
    inputs = scan.inputs
    span = (inputs.amax(dim=(1, 2, 3)) - inputs.amin(dim=(1, 2, 3)))[image]
    ranks = deletion_order(rel, seed)
    rows = _Imputed(inputs, image, ranks, counts.to(rel.device), noise_level * span, seed)
    predicted = scan.logits_at(rows, progress).argmax(dim=1).view(m, steps)
    curves = (predicted == target.view(-1, 1)).double().cpu()
    return (2 * torch.arange(steps, dtype=torch.double) + 1) / (2 * steps), curves


@register_metric(
    "road",
    family="faithfulness",
    description="Share of the fractions (k + ½)/steps (1 %, 3 %, …, 99 % at 50 steps) at which "
    "the model still predicts the target when that fraction of the most relevant pixels is "
    "removed by noisy linear imputation (ROAD, most relevant first).",
    higher_is_better=False,
    default=False,
    title="ROAD↓",
    cost="steps forwards and steps sparse solves per map",
    paper="Rong et al. 2022, arXiv:2202.00449",
)
def road_metric(ctx: MetricContext) -> dict[str, dict[str, Any]]:
    percentages, curves = road_curves(
        ctx.scan,
        ctx.stacked,
        ctx.image_ids,
        ctx.target_ids,
        steps=ctx.steps,
        noise_level=ctx.noise_level,
        seed=ctx.seed,
        progress=ctx.progress,
    )
    scores, split = ctx.split(curves.mean(dim=1)), ctx.split(curves)
    share = percentages.tolist()
    return {
        name: {"road": scores[name], "road_curve": {"share": share, "predicted": split[name]}}
        for name in ctx.names
    }


def pearson_columns(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each column of a and b (M, K): (K,), NaN where one is constant."""
    a, b = a - a.mean(dim=0), b - b.mean(dim=0)
    norms = a.norm(dim=0) * b.norm(dim=0)
    return torch.where(norms > 0, (a * b).sum(dim=0) / norms.clamp_min(1e-300), torch.nan)


def sensitivity_n(
    scan: Scan,
    rel: torch.Tensor,
    image: torch.Tensor,
    target: torch.Tensor,
    *,
    steps: int = 50,
    substrate: str | torch.Tensor | None = None,
    seed: int = 0,
    progress=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixel counts n (K,), probability drops (M, K), relevance removed in each step (M, K))
    of the maps `rel` (M, H, W) (see module doc); the correlation is taken per attribution."""
    m, h, w = rel.shape
    curves = causal_curves(
        scan,
        rel,
        image,
        target,
        kinds=("deletion",),
        steps=steps,
        substrates=None if substrate is None else {"deletion": substrate},
        seed=seed,
        progress=progress,
    )
    counts = (curves.fractions * h * w).round().long()
    probabilities = curves.probabilities["deletion"].double()
    drops = probabilities[:, :1] - probabilities[:, 1:]
    step = torch.bucketize(
        deletion_order(rel, seed).flatten(1), counts[1:].to(rel.device), right=True
    )
    removed = torch.zeros((m, steps), dtype=torch.double, device=rel.device)
    removed.scatter_add_(1, step, rel.flatten(1).double())
    kept = int((counts[1:] <= MAX_SHARE * h * w).sum())
    return counts[1 : kept + 1], drops[:, :kept], removed[:, :kept].cpu()


@register_metric(
    "sensitivity_n",
    family="faithfulness",
    description="Mean over n of the Pearson correlation, across the maps of one attribution, "
    "between the probability drop after removing the n most relevant pixels and the relevance "
    "of the last step removed (quantus' variant; one number per attribution).",
    higher_is_better=True,
    per_row=False,
    default=False,
    title="sens-n↑",
    cost="steps − 1 forwards per map (the deletion pass)",
    paper="Ancona et al. 2018, arXiv:1711.06104",
)
def sensitivity_n_metric(ctx: MetricContext) -> dict[str, dict[str, Any]]:
    counts, drops, removed = sensitivity_n(
        ctx.scan,
        ctx.stacked,
        ctx.image_ids,
        ctx.target_ids,
        steps=ctx.steps,
        substrate=ctx.substrate,
        seed=ctx.seed,
        progress=ctx.progress,
    )
    drops, removed = ctx.split(drops), ctx.split(removed)
    out = {}
    for name in ctx.names:
        pearson = pearson_columns(drops[name].flatten(0, 1), removed[name].flatten(0, 1))
        defined = pearson[~pearson.isnan()]
        mean = float(defined.mean()) if len(defined) else float("nan")
        curve = {"n": counts.tolist(), "pearson": pearson.tolist()}
        out[name] = {"sensitivity_n": mean, "sensitivity_n_curve": curve}
    return out
