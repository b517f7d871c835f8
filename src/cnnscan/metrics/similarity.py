"""Similarity of two maps: Spearman rank correlation and SSIM, batched in torch.

SSIM follows scikit-image's `structural_similarity` defaults (Wang et al. 2004 with a
uniform 7×7 window, sample covariance, K1 = 0.01, K2 = 0.03, mean over the positions where
the window fits), so numbers compare with Adebayo et al. 2018, who used scikit-image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cnnscan.errors import MetricError


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..P along the last dim of (M, P), ties sharing their average rank (as scipy)."""
    values = values.double()
    order = values.argsort(dim=-1, stable=True)
    ranked = values.gather(-1, order)
    position = torch.arange(1, values.shape[-1] + 1, dtype=torch.float64, device=values.device)
    # Tie groups: a new group starts where the sorted value changes.
    starts = torch.ones_like(ranked, dtype=torch.bool)
    starts[..., 1:] = ranked[..., 1:] != ranked[..., :-1]
    group = starts.long().cumsum(dim=-1) - 1  # group id per sorted position
    sums = torch.zeros_like(ranked).scatter_add_(-1, group, position.expand_as(ranked))
    counts = torch.zeros_like(ranked).scatter_add_(-1, group, torch.ones_like(ranked))
    mean_rank = sums.gather(-1, group) / counts.gather(-1, group)
    return torch.empty_like(mean_rank).scatter_(-1, order, mean_rank)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each pair of maps (M, ...) -> (M,); NaN when a map is
    constant (its ranks carry no order)."""
    a, b = a.flatten(1), b.flatten(1)
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    denominator = ra.norm(dim=1) * rb.norm(dim=1)
    return torch.where(denominator > 0, (ra * rb).sum(dim=1) / denominator, torch.nan)


def ssim(
    a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0, win_size: int = 7
) -> torch.Tensor:
    """Mean SSIM of each pair of maps (M, H, W) -> (M,), as scikit-image computes it."""
    if a.shape != b.shape or a.ndim != 3:
        raise MetricError(f"ssim needs two (M, H, W) stacks, got {a.shape} and {b.shape}")
    if win_size % 2 == 0 or win_size > min(a.shape[-2:]):
        raise MetricError(f"win_size must be odd and fit the {tuple(a.shape[-2:])} maps")
    x, y = a.double().unsqueeze(1), b.double().unsqueeze(1)
    n = win_size * win_size

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, win_size, stride=1)  # only where the window fits

    ux, uy = mean(x), mean(y)
    scale = n / (n - 1)  # sample covariance
    vx = scale * (mean(x * x) - ux * ux)
    vy = scale * (mean(y * y) - uy * uy)
    vxy = scale * (mean(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))
