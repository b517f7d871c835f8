"""Gradient family: vanilla gradient, gradient x input, guided backprop, DeconvNet,
SmoothGrad (wrapping any method), Integrated Gradients and GradientSHAP."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from cnnscan.errors import MethodError
from cnnscan.methods.baselines import BASELINES, make_baseline
from cnnscan.methods.options import (
    check_options,
    count,
    generator,
    is_int,
    number,
    within_budget,
)
from cnnscan.methods.registry import MethodResult, get_method, register

if TYPE_CHECKING:
    from cnnscan.engine.relu_rules import ReluRule
    from cnnscan.scan import Scan


# name -> (ReLU rule, multiplied by the input): the methods that are one backward each
_ONE_BACKWARD: dict[str, tuple[ReluRule, bool]] = {}


def _register_gradient(name: str, rule: ReluRule, times_input: bool, **info: Any) -> None:
    """One of the four one-backward methods: all share the scan's forward. With `unit=`
    they explain one unit of a layer instead of the target classes (see `unit_gradient`)."""
    _ONE_BACKWARD[name] = (rule, times_input)

    def method(scan: Scan, targets: torch.Tensor, *, unit: Unit | None = None) -> MethodResult:
        if unit is not None:
            return unit_gradient(scan, unit, rule, times_input)
        grads = scan.input_gradients(targets, rule)
        return MethodResult(grads * scan.inputs.unsqueeze(1) if times_input else grads)

    method.__doc__ = info["description"]
    register(name, family="gradient", relu_rules=rule != "standard", **info)(method)


_register_gradient(
    "gradient",
    "standard",
    False,
    description="Vanilla gradient of the target logit w.r.t. the input pixels (saliency).",
    cost="1 backward per target",
    paper="Simonyan et al. 2014, arXiv:1312.6034",
)
_register_gradient(
    "gradient_x_input",
    "standard",
    True,
    description="Gradient times input: first-order contribution of each pixel.",
    cost="1 backward per target",
    paper="Shrikumar et al. 2016, arXiv:1605.01713",
)
_register_gradient(
    "guided_backprop",
    "guided",
    False,
    description="Gradient with ReLUs passing only positive signal where the input was positive.",
    view="colour",
    cost="1 backward per target",
    paper="Springenberg et al. 2015, arXiv:1412.6806",
)
_register_gradient(
    "deconvnet",
    "deconv",
    False,
    description="DeconvNet: ReLUs rectify the backward signal, ignoring the forward mask.",
    view="colour",
    cost="1 backward per target",
    paper="Zeiler & Fergus 2014, arXiv:1311.2901",
)


Unit = tuple[str, int] | tuple[str, int, tuple[int, ...]]


def unit_gradient(scan: Scan, unit: Unit, rule: ReluRule, times_input: bool) -> MethodResult:
    """Explain one unit of a layer: `unit=(layer, channel)` keeps only the channel's strongest
    activation in each image (DeconvNet's reconstruction of a unit, Zeiler & Fergus 2014) and
    `(layer, channel, (row, col))` a chosen position; every other activation of the layer is
    zeroed and the unit is projected back to the pixels with the method's backward rule
    (max-pool switches come from autograd's max-pool backward). Maps are (N, 1, 3, H, W);
    `targets` hold the channel, `scores` the unit's activation."""
    layer, channel, position = _parse_unit(unit)
    acts = scan.activations(layer)
    if acts.ndim < 2:
        raise MethodError(f"unit= needs a layer with channels; {layer} outputs {tuple(acts.shape)}")
    n, channels, spatial = acts.shape[0], acts.shape[1], tuple(acts.shape[2:])
    if not 0 <= channel < channels:
        raise MethodError(
            f"channel {channel} is out of range: layer {layer} has {channels} channels "
            f"(0..{channels - 1})"
        )
    values = acts.detach()[:, channel].reshape(n, -1)
    if position is None:
        index = values.argmax(dim=1)  # the strongest activation of the channel
    else:
        if len(position) != len(spatial) or any(
            not 0 <= p < size for p, size in zip(position, spatial, strict=False)
        ):
            ranges = ", ".join(f"0..{size - 1}" for size in spatial) or "none"
            raise MethodError(
                f"position {tuple(position)} is outside layer {layer}'s "
                f"{'×'.join(map(str, spatial)) or 'non-spatial'} output (positions: {ranges})"
            )
        flat = int(np.ravel_multi_index(position, spatial)) if spatial else 0
        index = torch.full((n,), flat, dtype=torch.long, device=values.device)
    rows = torch.arange(n, device=values.device)
    seed = torch.zeros(acts.shape, dtype=acts.dtype, device=acts.device)
    seed.view(n, channels, -1)[rows, channel, index] = 1.0
    grads = scan.input_gradients_of(acts, seed, rule)
    maps = grads * scan.inputs if times_input else grads
    activation = values[rows, index]
    positions = (
        torch.stack(torch.unravel_index(index, spatial), dim=1) if spatial else index[:, None]
    )
    extras: dict[str, Any] = {
        "unit_layer": str(layer),
        "unit_channel": channel,
        "unit_position": positions.cpu(),
        "unit_activation": activation.cpu(),
    }
    if position is None and bool((activation <= 0).any()):
        silent = (activation <= 0).nonzero().flatten().tolist()
        extras["warning"] = (
            f"channel {channel} of {layer} is never positive on image(s) {silent}: the "
            "strongest activation is not a feature the network detected"
        )
    targets = torch.full((n, 1), channel, dtype=torch.long, device=values.device)
    return MethodResult(maps.unsqueeze(1), extras, str(layer), targets, activation.view(n, 1))


def _parse_unit(unit: Any) -> tuple[str, int, tuple[int, ...] | None]:
    """(layer, channel, position or None) from `unit=`, or a MethodError showing the form."""
    error = MethodError(
        "unit must be (layer, channel) or (layer, channel, (row, col)), e.g. "
        f"('features.28', 12); got {unit!r}"
    )
    if not isinstance(unit, list | tuple) or len(unit) not in (2, 3):
        raise error
    if not isinstance(unit[0], str) or not is_int(unit[1]):
        raise error
    if len(unit) == 2:
        return unit[0], int(unit[1]), None
    if not isinstance(unit[2], list | tuple) or not all(is_int(p) for p in unit[2]):
        raise error
    return unit[0], int(unit[1]), tuple(int(p) for p in unit[2])


def input_span(inputs: torch.Tensor) -> torch.Tensor:
    """max − min of each input: (N,)."""
    return inputs.amax(dim=(1, 2, 3)) - inputs.amin(dim=(1, 2, 3))


class _Accumulator:
    """Running Σm and Σm² of per-sample maps (N·S rows, image-major) per image, in float64
    so that VarGrad's E[m²] − E[m]² does not cancel catastrophically."""

    def __init__(self, n_images: int, n_samples: int):
        self.n_images, self.n_samples = n_images, n_samples
        self.sum: torch.Tensor | None = None
        self.sq: torch.Tensor | None = None

    def add(self, rows: slice, maps: torch.Tensor) -> None:
        if self.sum is None:
            shape = (self.n_images, *maps.shape[1:])
            self.sum = torch.zeros(shape, dtype=torch.float64, device=maps.device)
            self.sq = torch.zeros_like(self.sum)
        index = torch.arange(self.n_images * self.n_samples, device=maps.device)[rows]
        image = index // self.n_samples
        maps = maps.double()
        self.sum.index_add_(0, image, maps)
        self.sq.index_add_(0, image, maps * maps)

    def result(self, mode: str, dtype: torch.dtype) -> torch.Tensor:
        assert self.sum is not None and self.sq is not None
        mean = self.sum / self.n_samples
        if mode == "smoothgrad":
            out = mean
        elif mode == "smoothgrad_sq":
            out = self.sq / self.n_samples
        else:
            out = (self.sq / self.n_samples - mean * mean).clamp_min(0)
        return out.to(dtype)


# -- SmoothGrad ------------------------------------------------------------------------
_SMOOTH_MODES = ("smoothgrad", "smoothgrad_sq", "vargrad")


class NoisyInputs:
    """input + σ · ε for every image (outer) and sample (inner), built chunk by chunk.
    The noise ε (S, 3, H, W) is shared by every image, so an image gets the same result
    whether it is explained alone or in a batch."""

    def __init__(self, inputs: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor):
        self.inputs, self.noise, self.sigma = inputs, noise, sigma

    def __len__(self) -> int:
        return len(self.inputs) * len(self.noise)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        index = torch.arange(len(self), device=self.inputs.device)[rows]
        image, sample = index // len(self.noise), index % len(self.noise)
        return self.inputs[image] + self.sigma[image].view(-1, 1, 1, 1) * self.noise[sample]


def _one_backward_base(options: dict[str, Any]) -> bool:
    """SmoothGrad runs apart when its base is a one-backward method (no derived scans)."""
    return options.get("base", "gradient") in _ONE_BACKWARD and not options.get("base_options")


@register(
    "smoothgrad",
    family="gradient",
    description="A method averaged over noisy copies of the input "
    "(kind: smoothgrad, smoothgrad_sq, vargrad).",
    cost="n_samples × the base method",
    paper="Smilkov et al. 2017, arXiv:1706.03825; VarGrad: Adebayo et al. 2018",
    own_passes=_one_backward_base,
)
def smoothgrad(
    scan: Scan,
    targets: torch.Tensor,
    *,
    base: str = "gradient",
    n_samples: int = 25,
    noise_level: float = 0.15,
    kind: str = "smoothgrad",
    seed: int | None = 0,
    base_options: dict[str, Any] | None = None,
) -> MethodResult:
    """σ = noise_level · (max − min) of each input; `base` is any other method.

    The noise is ε = torch.randn((n_samples, 3, H, W), generator=Generator().manual_seed(seed))
    drawn on the CPU and shared by every image and target of the call. The one-backward
    bases (gradient, gradient_x_input, guided_backprop, deconvnet) run as one forward per
    chunk of noisy inputs with a backward per target; other bases run on derived scans.
    """
    if not isinstance(base, str):
        raise MethodError(f"base must be a method name, got {base!r}")
    base_info = get_method(base)
    if base_info.name == "smoothgrad":
        raise MethodError("smoothgrad cannot wrap itself; pick another base method")
    if kind not in _SMOOTH_MODES:
        raise MethodError(f"kind must be one of {_SMOOTH_MODES}, got {kind!r}")
    n_samples = count("n_samples", n_samples)
    noise_level = number("noise_level", noise_level)
    base_options = dict(base_options or {})
    check_options(base_info, base_options)
    inputs = scan.inputs
    n = len(inputs)
    per_sample = 4 * inputs[0].numel() + 8 * n * targets.shape[1]  # its noise and targets
    within_budget("n_samples", n_samples, n_samples * per_sample, scan.memory_budget)
    sigma = noise_level * input_span(inputs)
    noise = torch.randn((n_samples, *inputs.shape[1:]), generator=generator(seed))
    points = NoisyInputs(inputs, noise.to(inputs), sigma)
    repeated = targets.repeat_interleave(n_samples, dim=0)
    totals = _Accumulator(n, n_samples)
    if base_info.name in _ONE_BACKWARD and not base_options:  # (unit= takes the general path)
        rule, times_input = _ONE_BACKWARD[base_info.name]
        for rows, grads, _ in scan.iter_gradients(points, repeated, rule):
            totals.add(rows, grads * points[rows].unsqueeze(1) if times_input else grads)
    else:
        key = ("smoothgrad", base_info.name, tuple(inputs.shape[1:]), targets.shape[1])
        for rows in scan.batches(len(points), key):
            sub = scan.derive(points[rows], relu_rules=base_info.relu_rules)
            totals.add(rows, base_info.fn(sub, repeated[rows], **base_options).maps)
    maps = totals.result(kind, inputs.dtype)
    unit = None
    if base_options.get("unit") is not None:  # the base explained a layer unit, not classes
        layer, channel, _ = _parse_unit(base_options["unit"])
        unit = torch.full((n, 1), channel, dtype=torch.long, device=inputs.device)
    extras = {
        "base": base_info.name,
        "kind": kind,
        "n_samples": n_samples,
        "noise_level": noise_level,
        "sigma": sigma.cpu(),
        "seed": seed,
    }
    if unit is not None:
        extras["unit_layer"] = layer
    return MethodResult(maps, extras, targets=unit)


# -- Integrated Gradients ------------------------------------------------------------------
IG_RULES = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")


def path_points(n_steps: int, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Points α in [0, 1] and quadrature weights (summing to 1) for ∫₀¹ g(α) dα.

    The points are captum's; the trapezoid weights are 1/(n−1) (halved at both ends), where
    captum 0.9 uses 1/n, so its trapezoid attributions are (n−1)/n of the integral.
    """
    if rule not in IG_RULES:
        raise MethodError(f"rule must be one of {IG_RULES}, got {rule!r}")
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        return torch.tensor((nodes + 1) / 2), torch.tensor(weights / 2)
    if rule == "riemann_trapezoid":
        if n_steps < 2:
            raise MethodError("riemann_trapezoid needs n_steps >= 2")
        weights = torch.full((n_steps,), 1 / (n_steps - 1), dtype=torch.float64)
        weights[[0, -1]] /= 2
        return torch.linspace(0, 1, n_steps, dtype=torch.float64), weights
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[rule]
    alphas = (torch.arange(n_steps, dtype=torch.float64) + offset) / n_steps
    return alphas, torch.full((n_steps,), 1 / n_steps, dtype=torch.float64)


class PathInputs:
    """baseline + α (input − baseline) for every image (outer) and step (inner), built
    chunk by chunk so that hundreds of steps never sit in memory at once."""

    def __init__(self, inputs: torch.Tensor, baselines: torch.Tensor, alphas: torch.Tensor):
        self.inputs, self.baselines = inputs, baselines
        self.alphas = alphas.to(inputs.device, inputs.dtype)

    def __len__(self) -> int:
        return len(self.inputs) * len(self.alphas)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        index = torch.arange(len(self), device=self.inputs.device)[rows]
        image, step = index // len(self.alphas), index % len(self.alphas)
        base = self.baselines[image]
        return base + self.alphas[step].view(-1, 1, 1, 1) * (self.inputs[image] - base)


def _integrate(
    scan: Scan,
    inputs: torch.Tensor,
    baselines: torch.Tensor,
    targets: torch.Tensor,
    n_steps: int,
    rule: str,
) -> torch.Tensor:
    """(input − baseline) · Σ_s w_s ∇f(baseline + α_s (input − baseline)): (N, T, 3, H, W)."""
    alphas, weights = path_points(n_steps, rule)
    points = PathInputs(inputs, baselines, alphas)
    weights = weights.to(inputs.device, inputs.dtype)
    total = inputs.new_zeros((*targets.shape, *inputs.shape[1:]))
    repeated = targets.repeat_interleave(n_steps, dim=0)
    for rows, grads, _ in scan.iter_gradients(points, repeated):
        index = torch.arange(len(points), device=inputs.device)[rows]
        weighted = grads * weights[index % n_steps].view(-1, 1, 1, 1, 1)
        total.index_add_(0, index // n_steps, weighted)
    return total * (inputs - baselines).unsqueeze(1)


def completeness(maps: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σattr − (f(x) − f(x′)) and its size relative to |f(x) − f(x′)|, each (N, T), for
    (N, T, ...) attributions of any shape (input maps, a layer's units)."""
    error = maps.flatten(2).sum(dim=2) - delta
    return error, error.abs() / delta.abs().clamp_min(1e-12)


@register(
    "integrated_gradients",
    family="gradient",
    description="Integrated Gradients: path integral of gradients from a baseline; reports "
    "the completeness error Σattr − (f(x) − f(x′)).",
    cost="n_steps forwards + backwards per target",
    paper="Sundararajan et al. 2017, arXiv:1703.01365",
    own_passes=True,
)
def integrated_gradients(
    scan: Scan,
    targets: torch.Tensor,
    *,
    n_steps: int | Literal["auto"] = 50,
    baseline: str | torch.Tensor = "black",
    rule: str = "gausslegendre",
    tolerance: float = 0.01,
    max_steps: int = 800,
    seed: int | None = 0,
) -> MethodResult:
    """`n_steps="auto"` starts at 50 steps and doubles them, up to `max_steps`, for each
    (image, target) whose relative completeness error is above `tolerance`; pairs already
    within it keep their map, so an image's result does not depend on its batch."""
    auto = isinstance(n_steps, str) and n_steps == "auto"
    if not auto:
        if isinstance(n_steps, str):
            raise MethodError(f"n_steps must be a positive int or 'auto', got {n_steps!r}")
        count("n_steps", n_steps)
    if rule not in IG_RULES:
        raise MethodError(f"rule must be one of {IG_RULES}, got {rule!r}")
    tolerance = number("tolerance", tolerance, positive=True)
    max_steps = count("max_steps", max_steps, 2 if rule == "riemann_trapezoid" else 1)
    steps = min(50, max_steps) if auto else int(n_steps)
    most = max_steps if auto else steps
    quadrature = 16 * most**2 if rule == "gausslegendre" else 16 * most  # numpy's leggauss
    needs = quadrature + 8 * targets.numel() * most  # and the targets of every path point
    within_budget("max_steps" if auto else "n_steps", most, needs, scan.memory_budget)
    path_points(steps, rule)  # rejects n_steps the rule cannot use before any work
    inputs = scan.inputs
    baselines = make_baseline(scan, baseline, generator(seed))
    delta = scan.scores(targets) - scan.logits_at(baselines).gather(1, targets)
    maps = _integrate(scan, inputs, baselines, targets, steps, rule)
    used = torch.full(targets.shape, steps)
    error, relative = completeness(maps, delta)
    while auto and steps < max_steps and bool((relative > tolerance).any()):
        steps = min(steps * 2, max_steps)
        over = (relative > tolerance).cpu()
        groups: dict[tuple[int, ...], list[int]] = {}
        for image in range(len(inputs)):
            columns = tuple(over[image].nonzero().flatten().tolist())
            if columns:
                groups.setdefault(columns, []).append(image)
        for columns, images in groups.items():
            rows = torch.tensor(images, device=inputs.device).view(-1, 1)
            cols = torch.tensor(columns, device=inputs.device).view(1, -1)
            chosen = rows.view(-1)
            maps[rows, cols] = _integrate(
                scan, inputs[chosen], baselines[chosen], targets[rows, cols], steps, rule
            )
            used[rows.cpu(), cols.cpu()] = steps
        error, relative = completeness(maps, delta)
    extras: dict[str, Any] = {
        "baseline": baseline if isinstance(baseline, str) else "tensor",
        "rule": rule,
        "n_steps": int(used.max()),
        "n_steps_per_target": used,
        "completeness_error": error.cpu(),
        "completeness_error_relative": relative.cpu(),
        "delta": delta.cpu(),
    }
    if auto and bool((relative > tolerance).any()):
        extras["warning"] = (
            f"completeness error {float(relative.max()):.2%} is above the tolerance "
            f"{tolerance:.2%} at the cap of {max_steps} steps (raise max_steps=)"
        )
    return MethodResult(maps, extras)


# -- GradientSHAP ------------------------------------------------------------------------------
def baseline_pool(
    scan: Scan,
    baselines: str | tuple[str, ...] | list[str] | torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """The reference inputs of the SHAP methods, per image: (N, B, 3, H, W) from kinds (see
    `make_baseline`) or a tensor (B, 3, H, W) of reference inputs shared by every image."""
    inputs = scan.inputs
    if isinstance(baselines, torch.Tensor):
        pool = baselines.detach().to(inputs.device, inputs.dtype)
        pool = pool.unsqueeze(0) if pool.ndim == 3 else pool
        if pool.ndim != 4 or pool.shape[1:] != inputs.shape[1:] or len(pool) == 0:
            raise MethodError(
                f"baselines tensor must be (B, {', '.join(map(str, inputs.shape[1:]))}), "
                f"got {tuple(baselines.shape)}"
            )
        return pool.unsqueeze(0).expand(len(inputs), *pool.shape)
    if isinstance(baselines, str):
        baselines = (baselines,)
    if len(baselines) == 0:
        raise MethodError(f"baselines is empty; give kinds from {BASELINES} or a tensor")
    return torch.stack([make_baseline(scan, kind, gen) for kind in baselines], dim=1)


class _ShapPoints:
    """b + α (x − b) (+ σ ε) for every image (outer) and sample (inner), built lazily; the
    baseline choices, α and ε are shared by every image."""

    def __init__(self, inputs, pool, choice, alphas, noise, sigma):
        self.inputs, self.pool, self.choice, self.alphas = inputs, pool, choice, alphas
        self.noise, self.sigma = noise, sigma

    def __len__(self) -> int:
        return len(self.inputs) * len(self.choice)

    def rows(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(len(self), device=self.inputs.device)[rows]
        return index // len(self.choice), index % len(self.choice)

    def difference(self, rows: slice) -> torch.Tensor:
        """x − b for the rows."""
        image, sample = self.rows(rows)
        return self.inputs[image] - self.pool[image, self.choice[sample]]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        image, sample = self.rows(rows)
        base = self.pool[image, self.choice[sample]]
        points = base + self.alphas[sample].view(-1, 1, 1, 1) * (self.inputs[image] - base)
        if self.noise is not None:
            points = points + self.sigma[image].view(-1, 1, 1, 1) * self.noise[sample]
        return points


@register(
    "gradient_shap",
    family="gradient",
    description="GradientSHAP / expected gradients: gradients at random points between "
    "random baselines and the input, times (input − baseline), averaged.",
    cost="n_samples forwards + backwards per target",
    paper="Lundberg & Lee 2017, arXiv:1705.07874; Erion et al. 2021, arXiv:1906.10670",
    own_passes=True,
)
def gradient_shap(
    scan: Scan,
    targets: torch.Tensor,
    *,
    n_samples: int = 25,
    baselines: tuple[str, ...] | list[str] | torch.Tensor = ("black", "blur", "noise"),
    noise_level: float = 0.0,
    seed: int | None = 0,
) -> MethodResult:
    """Baselines are drawn uniformly from `baselines`: kinds (see `make_baseline`) or a tensor
    (B, 3, H, W) of reference inputs; `noise_level` adds SmoothGrad-style noise
    (σ = noise_level · (max − min)) to the points, not to the (x − b) factor."""
    n_samples = count("n_samples", n_samples)
    noise_level = number("noise_level", noise_level)
    gen = generator(seed)
    inputs = scan.inputs
    n = len(inputs)
    per_sample = 12 + 8 * n * targets.shape[1] + (4 * inputs[0].numel() if noise_level else 0)
    within_budget("n_samples", n_samples, n_samples * per_sample, scan.memory_budget)
    pool = baseline_pool(scan, baselines, gen)
    choice = torch.randint(pool.shape[1], (n_samples,), generator=gen).to(inputs.device)
    alphas = torch.rand((n_samples,), generator=gen).to(inputs)
    noise = None
    if noise_level > 0:
        noise = torch.randn((n_samples, *inputs.shape[1:]), generator=gen).to(inputs)
    points = _ShapPoints(inputs, pool, choice, alphas, noise, noise_level * input_span(inputs))
    totals = _Accumulator(n, n_samples)
    repeated = targets.repeat_interleave(n_samples, dim=0)
    for rows, grads, _ in scan.iter_gradients(points, repeated):
        totals.add(rows, grads * points.difference(rows).unsqueeze(1))
    return MethodResult(totals.result("smoothgrad", inputs.dtype), {"n_samples": n_samples})
