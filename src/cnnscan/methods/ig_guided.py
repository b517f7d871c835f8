"""Gradient family, Guided IG: Integrated Gradients along an adaptive path that at each step
moves the features with the smallest gradients first (Kapishnikov et al. 2021)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cnnscan.errors import MethodError
from cnnscan.methods.baselines import make_baseline
from cnnscan.methods.options import count, number
from cnnscan.methods.registry import MethodResult, register

if TYPE_CHECKING:
    from cnnscan.scan import Scan

EPSILON = 1e-9  # PAIR's tolerance for "the step reached its L1 distance"


def _isclose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """math.isclose(a, b, rel_tol=EPSILON, abs_tol=EPSILON), elementwise."""
    return (a - b).abs() <= (EPSILON * torch.maximum(a.abs(), b.abs())).clamp_min(EPSILON)


class _Path:
    """The state of every (image, target) path, flattened to rows (P, D) in float64 as PAIR
    keeps it: the point x, the attribution so far, and the fixed ends of the straight line."""

    def __init__(self, inputs: torch.Tensor, baselines: torch.Tensor, n_targets: int):
        flat = inputs.double().flatten(1).repeat_interleave(n_targets, dim=0)
        self.end = flat
        self.start = baselines.double().flatten(1).repeat_interleave(n_targets, dim=0)
        self.span = self.end - self.start
        self.x = self.start.clone()
        self.attr = torch.zeros_like(flat)
        self.l1_total = self.span.abs().sum(dim=1)

    def at(self, alpha: float) -> torch.Tensor:
        """The straight-line point at `alpha` (PAIR's translate_alpha_to_x)."""
        return self.start + self.span * alpha

    def step(self, grad: torch.Tensor, step: int, steps: int, fraction: float, max_dist: float):
        """One of PAIR's steps, for every row at once: move x until its L1 distance to the
        input is the step's target, the lowest-|gradient| `fraction` of the movable features at
        a time, never further than `max_dist` (in α) from the straight line; integrate the
        gradient `grad` (P, D) at the step's start along the moves."""
        alpha = (step + 1.0) / steps
        alpha_min, alpha_max = max(alpha - max_dist, 0.0), min(alpha + max_dist, 1.0)
        x_min, x_max = self.at(alpha_min), self.at(alpha_max)
        l1_target = self.l1_total * (1 - (step + 1) / steps)
        ranked = grad.clone()  # features already at x_max get +inf: never selected again
        kth = int(fraction * (grad.shape[1] - 1)) + 1  # numpy's quantile(method="lower")
        active = self.l1_total != 0  # a path of length zero has a zero attribution
        x = self.x
        while bool(active.any()):
            x_old = x
            x_alpha = torch.where(self.span != 0, (x - self.start) / self.span, alpha_max)
            x = torch.where((x_alpha < alpha_min) & active[:, None], x_min, x)
            l1_current = (x - self.end).abs().sum(dim=1)
            active = active & ~_isclose(l1_target, l1_current)
            ranked[(x == x_max) & active[:, None]] = torch.inf
            magnitude = ranked.abs()
            threshold = magnitude.kthvalue(kth, dim=1, keepdim=True).values
            chosen = (magnitude <= threshold) & (ranked != torch.inf) & active[:, None]
            l1_s = ((x - x_max).abs() * chosen).sum(dim=1)
            gamma = torch.where(l1_s > 0, (l1_current - l1_target) / l1_s, torch.inf)[:, None]
            moved = torch.where(gamma > 1.0, x_max, x + (x_max - x) * gamma)
            x = torch.where(chosen, moved, x)
            self.attr += (x - x_old) * grad
            active = active & (gamma[:, 0] > 1.0)
        self.x = x


@register(
    "guided_ig",
    family="gradient",
    description="Guided IG: Integrated Gradients along an adaptive path that first moves "
    "the features with the smallest gradients.",
    cost="n_steps forwards + backwards per target, one after another",
    paper="Kapishnikov et al. 2021, arXiv:2106.09788",
    in_default_scan=False,
)
def guided_ig(
    scan: Scan,
    targets: torch.Tensor,
    *,
    n_steps: int = 200,
    fraction: float = 0.25,
    max_dist: float = 0.02,
    baseline: str | torch.Tensor = "zero",
) -> MethodResult:
    """PAIR saliency 0.2.1's GuidedIG, in float64 on the path: each step takes the gradient at
    the current point of every (image, target) path (one batched pass for all of them), then
    moves the points. `max_dist=0` is IG on the straight line, 1 an unbounded path."""
    n_steps = count("n_steps", n_steps)
    fraction = number("fraction", fraction)
    max_dist = number("max_dist", max_dist)
    for name, value in (("fraction", fraction), ("max_dist", max_dist)):
        if value > 1:
            raise MethodError(f"{name} must be in [0, 1], got {value!r}")
    inputs = scan.inputs
    n, t = targets.shape
    path = _Path(inputs, make_baseline(scan, baseline), t)
    rows = targets.reshape(-1, 1)
    for step in range(n_steps):
        points = path.x.to(inputs.dtype).view(n * t, *inputs.shape[1:])
        grads, _ = scan.gradients_at(points, rows)
        path.step(grads.flatten(1).double(), step, n_steps, fraction, max_dist)
    maps = path.attr.view(n, t, *inputs.shape[1:]).to(inputs.dtype)
    extras = {"n_steps": n_steps, "fraction": fraction, "max_dist": max_dist}
    extras["baseline"] = baseline if isinstance(baseline, str) else "tensor"
    return MethodResult(maps, extras)
