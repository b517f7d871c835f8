"""Gradient family, attribution to a layer's units: layer conductance and internal influence
(captum's LayerConductance and InternalInfluence). Both integrate the gradient of the target
w.r.t. the layer's output along the straight path from a baseline to the input; the map is
the per-position sum over channels (a layer map like a CAM's), every unit's value is kept in
`extras["units"]` (N, T, C, h, w)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from cnnscan.methods.baselines import make_baseline
from cnnscan.methods.cam import layer_name
from cnnscan.methods.gradient import PathInputs, completeness, path_points
from cnnscan.methods.options import count, generator
from cnnscan.methods.registry import MethodResult, register

if TYPE_CHECKING:
    from cnnscan.scan import Scan


def _along_path(
    scan: Scan, layer: str, targets: torch.Tensor, alphas: torch.Tensor, baseline: Any, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(activations (N, S, *shape), gradients (N, S, T, *shape)) of the layer at the S path
    points of each image, and the baselines."""
    inputs = scan.inputs
    baselines = make_baseline(scan, baseline, generator(seed))
    scan.activations(layer)  # recorded by derived scans from now on
    points = PathInputs(inputs, baselines, alphas)
    steps = len(alphas)
    repeated = targets.repeat_interleave(steps, dim=0)
    acts, grads = [], []
    key = ("layer_path", layer, tuple(inputs.shape[1:]), targets.shape[1])
    for rows in scan.batches(len(points), key):
        sub = scan.derive(points[rows], relu_rules=False)
        acts.append(sub.activations(layer).detach())
        grads.append(sub.layer_gradients(layer, repeated[rows]).detach())
    n = len(inputs)
    act = torch.cat(acts)
    grad = torch.cat(grads)
    return act.view(n, steps, *act.shape[1:]), grad.view(n, steps, *grad.shape[1:]), baselines


def _layer_result(
    scan: Scan, layer: str, units: torch.Tensor, extras: dict[str, Any]
) -> MethodResult:
    """Maps (N, T, 1, h, w) summed over channels (a non-spatial layer: (N, T, 1, 1, C))."""
    maps = units.sum(dim=2, keepdim=True) if units.ndim == 5 else units[:, :, None, None, :]
    return MethodResult(maps, {"units": units.cpu(), **extras}, layer=layer)


@register(
    "layer_conductance",
    family="gradient",
    space="layer",
    description="Layer conductance: the share of the target's change from the baseline that "
    "flows through each unit of a layer (Σ_units ≈ f(x) − f(x′)).",
    cost="n_steps + 1 forwards + backwards (through the part after the layer) per target",
    paper="Dhamdhere et al. 2018, arXiv:1805.12233",
    in_default_scan=False,
)
def layer_conductance(
    scan: Scan,
    targets: torch.Tensor,
    *,
    layer: str | None = None,
    n_steps: int = 50,
    baseline: str | torch.Tensor = "black",
    rule: str = "gausslegendre",
    seed: int = 0,
) -> MethodResult:
    """Σ_s ∂f/∂y(x_s) · (y(x_{s+1}) − y(x_s)) over the n_steps + 1 points of `rule` (captum's
    points; its default rule); with `rule="riemann_trapezoid"` the points include the baseline
    and the input, so the units sum to f(x) − f(x′) as the steps grow."""
    n_steps = count("n_steps", n_steps)
    layer = layer_name(scan, layer)
    alphas, _ = path_points(n_steps + 1, rule)
    acts, grads, baselines = _along_path(scan, layer, targets, alphas, baseline, seed)
    steps = (acts[:, 1:] - acts[:, :-1]).unsqueeze(2)  # (N, S-1, 1, *shape)
    units = (grads[:, :-1] * steps).sum(dim=1)
    delta = scan.scores(targets) - scan.logits_at(baselines).gather(1, targets)
    error, relative = completeness(units, delta)
    extras = {
        "n_steps": n_steps,
        "rule": rule,
        "completeness_error": error.cpu(),
        "completeness_error_relative": relative.cpu(),
    }
    return _layer_result(scan, layer, units, extras)


@register(
    "internal_influence",
    family="gradient",
    space="layer",
    description="Internal influence: the gradient of the target w.r.t. each unit of a layer, "
    "integrated along the path from the baseline to the input.",
    cost="n_steps forwards + backwards (through the part after the layer) per target",
    paper="Leino et al. 2018, arXiv:1802.03788",
    in_default_scan=False,
)
def internal_influence(
    scan: Scan,
    targets: torch.Tensor,
    *,
    layer: str | None = None,
    n_steps: int = 50,
    baseline: str | torch.Tensor = "black",
    rule: str = "gausslegendre",
    seed: int = 0,
) -> MethodResult:
    """Σ_s w_s ∂f/∂y(x_s) with the quadrature of `rule` (Integrated Gradients' at the layer,
    not multiplied by the change of the unit)."""
    n_steps = count("n_steps", n_steps)
    layer = layer_name(scan, layer)
    alphas, weights = path_points(n_steps, rule)
    _, grads, _ = _along_path(scan, layer, targets, alphas, baseline, seed)
    weights = weights.to(grads).view(1, -1, *[1] * (grads.ndim - 2))
    units = (grads * weights).sum(dim=1)
    return _layer_result(scan, layer, units, {"n_steps": n_steps, "rule": rule})
