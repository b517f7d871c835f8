"""Gradient family: vanilla gradient, gradient x input, guided backprop, DeconvNet,
SmoothGrad (wrapping any method), Integrated Gradients and GradientSHAP."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from cnnscan.errors import MethodError
from cnnscan.methods import MethodResult, check_options, get_method, register
from cnnscan.relu import Rule

if TYPE_CHECKING:
    from cnnscan.scan import Scan


def _register_gradient(name: str, rule: Rule, times_input: bool, **info: Any) -> None:
    """One of the four one-backward methods: all share the scan's forward."""

    def method(scan: Scan, targets: torch.Tensor) -> MethodResult:
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


def generator(seed: int | None) -> torch.Generator:
    """A CPU generator: seeded results are the same on every device."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _span(inputs: torch.Tensor) -> torch.Tensor:
    """max − min of each input, shaped to broadcast over (N, S, 3, H, W)."""
    return (inputs.amax(dim=(1, 2, 3)) - inputs.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1, 1)


# -- SmoothGrad ------------------------------------------------------------------------
_SMOOTH_MODES = ("smoothgrad", "smoothgrad_sq", "vargrad")


@register(
    "smoothgrad",
    family="gradient",
    description="A method averaged over noisy copies of the input "
    "(modes: smoothgrad, smoothgrad_sq, vargrad).",
    cost="n_samples × the base method",
    paper="Smilkov et al. 2017, arXiv:1706.03825; VarGrad: Adebayo et al. 2018",
)
def smoothgrad(
    scan: Scan,
    targets: torch.Tensor,
    *,
    base: str = "gradient",
    n_samples: int = 25,
    noise_level: float = 0.15,
    mode: str = "smoothgrad",
    seed: int | None = 0,
    base_options: dict[str, Any] | None = None,
) -> MethodResult:
    """σ = noise_level · (max − min) of each input; `base` is any other method."""
    base_info = get_method(base)
    if base_info.name == "smoothgrad":
        raise MethodError("smoothgrad cannot wrap itself; pick another base method")
    if mode not in _SMOOTH_MODES:
        raise MethodError(f"mode must be one of {_SMOOTH_MODES}, got {mode!r}")
    if n_samples < 1 or noise_level < 0:
        raise MethodError("n_samples must be >= 1 and noise_level >= 0")
    base_options = dict(base_options or {})
    check_options(base_info, base_options)
    inputs = scan.inputs
    n = len(inputs)
    noise = torch.randn((n, n_samples, *inputs.shape[1:]), generator=generator(seed))
    noisy = (inputs.unsqueeze(1) + noise.to(inputs) * (noise_level * _span(inputs))).flatten(0, 1)
    repeated = targets.repeat_interleave(n_samples, dim=0)
    chunks = []
    key = ("smoothgrad", base, tuple(inputs.shape[1:]), targets.shape[1])
    for rows in scan.batches(len(noisy), key):
        sub = scan.derive(noisy[rows], relu_rules=base_info.relu_rules)
        chunks.append(base_info.fn(sub, repeated[rows], **base_options).maps)
    maps = torch.cat(chunks)
    maps = maps.view(n, n_samples, *maps.shape[1:])
    if mode == "smoothgrad":
        maps = maps.mean(dim=1)
    elif mode == "smoothgrad_sq":
        maps = (maps * maps).mean(dim=1)
    else:
        maps = maps.var(dim=1, unbiased=False)
    return MethodResult(maps, {"base": base, "mode": mode, "n_samples": n_samples})


# -- baselines ---------------------------------------------------------------------------
def make_baseline(
    scan: Scan, baseline: str | torch.Tensor, gen: torch.Generator | None = None
) -> torch.Tensor:
    """A reference input per image of the scan, in model space: "black", "zero" (all-zero
    tensor, captum's default), "mean" (each image's mean colour), "blur", "noise" (uniform
    random pixels) or a tensor (3, H, W) / (N, 3, H, W)."""
    inputs = scan.inputs
    if isinstance(baseline, torch.Tensor):
        base = baseline.to(inputs.device, inputs.dtype)
        try:
            return base.expand_as(inputs)
        except RuntimeError as e:
            raise MethodError(
                f"baseline of shape {tuple(baseline.shape)} does not match inputs "
                f"{tuple(inputs.shape)}"
            ) from e
    normalize = scan.model.preprocessing.normalize
    if baseline == "black":
        return normalize(torch.zeros_like(inputs))
    if baseline == "zero":
        return torch.zeros_like(inputs)
    if baseline == "mean":
        return inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs)
    if baseline == "blur":
        return gaussian_blur(inputs, sigma=max(inputs.shape[-2:]) / 16)
    if baseline == "noise":
        gen = gen or generator(0)
        return normalize(torch.rand(inputs.shape, generator=gen).to(inputs))
    raise MethodError(
        f"unknown baseline {baseline!r}; use black, zero, mean, blur, noise or a tensor"
    )


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W), reflect padding, radius 3σ (within the image)."""
    radius = max(1, min(int(3 * sigma), min(x.shape[-2:]) - 1))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    out = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


# -- Integrated Gradients ------------------------------------------------------------------
IG_RULES = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")


def path_points(n_steps: int, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Points α in [0, 1] and quadrature weights for ∫₀¹ g(α) dα (captum's rules)."""
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


class _PathInputs:
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
    scan: Scan, baselines: torch.Tensor, targets: torch.Tensor, n_steps: int, rule: str
) -> torch.Tensor:
    """(input − baseline) · Σ_s w_s ∇f(baseline + α_s (input − baseline)): (N, T, 3, H, W)."""
    inputs = scan.inputs
    alphas, weights = path_points(n_steps, rule)
    points = _PathInputs(inputs, baselines, alphas)
    weights = weights.to(inputs.device, inputs.dtype)
    total = torch.zeros((*targets.shape, *inputs.shape[1:]), device=inputs.device)
    repeated = targets.repeat_interleave(n_steps, dim=0)
    for rows, grads, _ in scan.iter_gradients(points, repeated):
        index = torch.arange(len(points), device=inputs.device)[rows]
        weighted = grads * weights[index % n_steps].view(-1, 1, 1, 1, 1)
        total.index_add_(0, index // n_steps, weighted)
    return total * (inputs - baselines).unsqueeze(1)


@register(
    "integrated_gradients",
    family="gradient",
    description="Integrated Gradients: path integral of gradients from a baseline; reports "
    "the completeness error Σattr − (f(x) − f(x′)).",
    cost="n_steps forwards + backwards per target",
    paper="Sundararajan et al. 2017, arXiv:1703.01365",
)
def integrated_gradients(
    scan: Scan,
    targets: torch.Tensor,
    *,
    n_steps: int | str = 50,
    baseline: str | torch.Tensor = "black",
    rule: str = "gausslegendre",
    tolerance: float = 0.01,
    max_steps: int = 800,
    seed: int | None = 0,
) -> MethodResult:
    """`n_steps="auto"` doubles the steps (from 50) until the relative completeness error
    is within `tolerance`, up to `max_steps`; only targets not yet within it are recomputed."""
    auto = n_steps == "auto"
    if not auto and (isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1):
        raise MethodError(f"n_steps must be a positive int or 'auto', got {n_steps!r}")
    baselines = make_baseline(scan, baseline, generator(seed))
    delta = scan.scores(targets) - scan.logits_at(baselines).gather(1, targets)
    steps = 50 if auto else int(n_steps)
    maps = _integrate(scan, baselines, targets, steps, rule)
    used = torch.full(targets.shape, steps)
    pending = torch.arange(targets.shape[1])
    while True:
        error = maps.sum(dim=(2, 3, 4)) - delta
        relative = error.abs() / delta.abs().clamp_min(1e-12)
        pending = (relative > tolerance).any(dim=0).nonzero().flatten().cpu()
        if not auto or len(pending) == 0 or steps >= max_steps:
            break
        steps = min(steps * 2, max_steps)
        columns = pending.to(targets.device)
        maps[:, columns] = _integrate(scan, baselines, targets[:, columns], steps, rule)
        used[:, pending] = steps
    extras: dict[str, Any] = {
        "baseline": baseline if isinstance(baseline, str) else "tensor",
        "rule": rule,
        "n_steps": int(used.max()),
        "n_steps_per_target": used,
        "completeness_error": error.cpu(),
        "completeness_error_relative": relative.cpu(),
        "delta": delta.cpu(),
    }
    if auto and len(pending):
        extras["warning"] = (
            f"completeness error {float(relative.max()):.2%} is above the tolerance "
            f"{tolerance:.2%} at the cap of {max_steps} steps"
        )
    return MethodResult(maps, extras)


# -- GradientSHAP ------------------------------------------------------------------------------
@register(
    "gradient_shap",
    family="gradient",
    description="GradientSHAP / expected gradients: gradients at random points between "
    "random baselines and the input, times (input − baseline), averaged.",
    cost="n_samples forwards + backwards per target",
    paper="Lundberg & Lee 2017, arXiv:1705.07874; Erion et al. 2021, arXiv:1906.10670",
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
    (B, 3, H, W) of reference inputs; `noise_level` adds SmoothGrad-style noise to the points."""
    if n_samples < 1:
        raise MethodError("n_samples must be >= 1")
    gen = generator(seed)
    inputs = scan.inputs
    n = len(inputs)
    if isinstance(baselines, torch.Tensor):
        pool = baselines.to(inputs.device, inputs.dtype)
        pool = pool.unsqueeze(0) if pool.ndim == 3 else pool
        pool = pool.unsqueeze(0).expand(n, *pool.shape)
    else:
        pool = torch.stack([make_baseline(scan, kind, gen) for kind in baselines], dim=1)
    choice = torch.randint(pool.shape[1], (n, n_samples), generator=gen).to(inputs.device)
    chosen = pool[torch.arange(n, device=inputs.device).unsqueeze(1), choice]
    alphas = torch.rand((n, n_samples, 1, 1, 1), generator=gen).to(inputs)
    x = inputs.unsqueeze(1)
    points = chosen + alphas * (x - chosen)
    if noise_level > 0:
        noise = torch.randn(points.shape, generator=gen).to(points)
        points = points + noise * (noise_level * _span(inputs))
    grads, _ = scan.gradients_at(points.flatten(0, 1), targets.repeat_interleave(n_samples, 0))
    grads = grads.view(n, n_samples, *grads.shape[1:])
    maps = (grads * (x - chosen).unsqueeze(2)).mean(dim=1)
    return MethodResult(maps, {"n_samples": n_samples})
