"""CAM family, gradient CAMs: class activation maps at a layer from the scan's shared forward.

Every method here combines the layer's activations A (N, K, h, w) with gradients g of a
target's score w.r.t. A (taken once per target from the shared forward, through the part of
the network after the layer) into one map per target. Most differ only in that combination
(a combiner registered by `_register_gradient_cam`); Finer-CAM and Shapley-CAM change what is
differentiated, Smooth Grad-CAM++ averages the gradients over noisy inputs, FullGrad sums
gradient × bias over every layer. Maps are relu'd; the raw map is kept in `extras["raw"]`.
The activation-only CAMs are in `cam_activation`, those that run extra forwards in
`cam_perturbation`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cnnscan.attribution import minmax_maps, resize_maps
from cnnscan.errors import LayerError, MethodError
from cnnscan.layers import LayerRef, get_module
from cnnscan.methods.gradient import NoisyInputs, input_span
from cnnscan.methods.options import count, generator, number
from cnnscan.methods.registry import MethodResult, register

if TYPE_CHECKING:
    from cnnscan.scan import Scan

_EPS = 1e-7


def layer_name(scan: Scan, layer: str | None) -> str:
    """`layer`, or the scan's default CAM layer (the last spatial one) when None."""
    return scan.default_layer() if layer is None else str(layer)


def spatial_activations(scan: Scan, layer: str) -> torch.Tensor:
    """The layer's output (N, K, h, w), detached; an error if it has no spatial extent."""
    acts = scan.activations(layer)
    if acts.ndim != 4 or acts.shape[-1] * acts.shape[-2] < 2:
        spatial = [row.name for row in scan.layer_table() if _is_spatial(row.output_shape)]
        raise LayerError(
            f"layer {layer!r} outputs shape {tuple(acts.shape[1:])}; CAMs need a spatial "
            f"(C, H, W) output. Spatial layers near the end: {', '.join(spatial[-6:])}"
        )
    return acts.detach()


def _is_spatial(shape: tuple[int, ...] | None) -> bool:
    return shape is not None and len(shape) == 3 and shape[1] * shape[2] > 1


def weighted_sum(weights: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """Σ_k w[n, t, k] · A[n, k]: (N, T, h, w)."""
    return torch.einsum("ntk,nkhw->nthw", weights, acts)


def cam_result(raw: torch.Tensor, layer: str, extras: dict[str, Any] | None = None) -> MethodResult:
    """Relu'd maps (N, T, 1, h, w) from raw maps (N, T, h, w), the raw map kept in extras."""
    raw = raw.unsqueeze(2)
    return MethodResult(raw.clamp_min(0), {"raw": raw, **(extras or {})}, layer=layer)


def first_component(x: torch.Tensor) -> torch.Tensor:
    """Projection of the centred positions of x (..., K, h, w) on their first principal
    component: (..., h, w). SVD leaves the sign open; it is flipped so that the largest
    magnitude is positive, as in Seg-Eigen-CAM (Chung & Ying 2025, eq. 13)."""
    *lead, k, h, w = x.shape
    flat = x.reshape(-1, k, h * w).transpose(1, 2).double()  # (B, hw, K)
    centred = flat - flat.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projection = (centred @ vh[:, 0, :].unsqueeze(-1)).squeeze(-1)  # (B, hw)
    flip = projection.amin(dim=1).abs() > projection.amax(dim=1).abs()
    projection = torch.where(flip.unsqueeze(1), -projection, projection)
    return projection.to(x.dtype).view(*lead, h, w)


def unused_targets(grads: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """Say so when a target's logit does not depend on the layer (its map is all zeros)."""
    dead = (grads.flatten(2) == 0).all(dim=2)  # (N, T)
    if not bool(dead.any()):
        return {}
    classes = sorted({int(c) for c in targets[dead].tolist()})
    return {"warning": f"class(es) {classes} do not depend on this layer: their maps are zero"}


# -- gradient CAMs: each says only how it weighs activations with gradients -----------------
GradCombiner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _gradcam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    return weighted_sum(grads.mean(dim=(-2, -1)), acts)


def _gradcam_pp_moments(
    acts: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, d3: torch.Tensor
) -> torch.Tensor:
    """Grad-CAM++ from the first three gradient moments (paper eq. 19: α = g² / (2g² + g³ Σ A));
    plain Grad-CAM++ has d_p = g^p, Smooth Grad-CAM++ their means over noisy inputs."""
    total = acts.sum(dim=(-2, -1), keepdim=True).unsqueeze(1)  # Σ_ab A_k(a, b)
    alpha = torch.where(d2 != 0, d2 / (2 * d2 + total * d3 + 1e-6), 0.0)
    return weighted_sum((alpha * d1.clamp_min(0)).sum(dim=(-2, -1)), acts)


def _gradcam_pp(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    g2 = grads * grads
    return _gradcam_pp_moments(acts, grads, g2, g2 * grads)


def _xgradcam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    share = acts / (acts.sum(dim=(-2, -1), keepdim=True) + _EPS)
    return weighted_sum((grads * share.unsqueeze(1)).sum(dim=(-2, -1)), acts)


def _hirescam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    return (grads * acts.unsqueeze(1)).sum(dim=2)


def _gradcam_elementwise(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    return (grads * acts.unsqueeze(1)).clamp_min(0).sum(dim=2)


def _eigengradcam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    return first_component(grads * acts.unsqueeze(1))


def _layercam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    return (grads.clamp_min(0) * acts.unsqueeze(1)).sum(dim=2)


def layer_cam_map(scan: Scan, targets: torch.Tensor, layer: str, combine: GradCombiner):
    """(raw map (N, T, h, w), extras) of a gradient CAM at one layer."""
    acts = spatial_activations(scan, layer)
    grads = scan.layer_gradients(layer, targets)
    return combine(acts, grads), unused_targets(grads, targets)


# Every gradient combiner by method name: Finer-CAM applies any of them to its contrast.
_COMBINERS: dict[str, GradCombiner] = {"layercam": _layercam}


def _register_gradient_cam(name: str, combine: GradCombiner, **info: Any) -> None:
    def method(scan: Scan, targets: torch.Tensor, *, layer: str | None = None) -> MethodResult:
        layer = layer_name(scan, layer)
        raw, extras = layer_cam_map(scan, targets, layer, combine)
        return cam_result(raw, layer, extras)

    method.__doc__ = info["description"]
    _COMBINERS[name] = combine
    register(name, family="cam", space="layer", signed=False, cost="1 backward per target", **info)(
        method
    )


_register_gradient_cam(
    "gradcam",
    _gradcam,
    description="Grad-CAM: channels weighted by their mean gradient, summed, relu'd.",
    paper="Selvaraju et al. 2017, arXiv:1610.02391",
)
_register_gradient_cam(
    "gradcam_pp",
    _gradcam_pp,
    description="Grad-CAM++: channels weighted by positive gradients with per-pixel "
    "α = g² / (2g² + Σ A · g³).",
    paper="Chattopadhay et al. 2018, arXiv:1710.11063",
)
_register_gradient_cam(
    "xgradcam",
    _xgradcam,
    description="XGrad-CAM: channels weighted by gradients averaged with the activation "
    "as weight (axiom-based).",
    paper="Fu et al. 2020, arXiv:2008.02312",
)
_register_gradient_cam(
    "hirescam",
    _hirescam,
    description="HiResCAM: element-wise gradient × activation summed over channels "
    "(faithful to the model for a GAP head).",
    paper="Draelos & Carin 2020, arXiv:2011.08891",
)
_register_gradient_cam(
    "gradcam_elementwise",
    _gradcam_elementwise,
    description="Grad-CAM element-wise: relu(gradient × activation) summed over channels.",
    paper="pytorch-grad-cam's GradCAMElementWise (Gildenblat et al. 2021)",
    in_default_scan=False,
)
_register_gradient_cam(
    "eigengradcam",
    _eigengradcam,
    description="Eigen-Grad-CAM: first principal component of gradient × activation.",
    paper="Muhammad & Yeasin 2020, arXiv:2008.00299 (with gradients: pytorch-grad-cam)",
    in_default_scan=False,
)


@register(
    "layercam",
    family="cam",
    space="layer",
    signed=False,
    description="LayerCAM: relu(gradient) × activation per position; several layers fuse "
    "by tanh scaling and an element-wise maximum.",
    cost="1 backward per target and layer",
    paper="Jiang et al. 2021, IEEE TIP 30:5875",
)
def layercam(
    scan: Scan, targets: torch.Tensor, *, layer: str | Sequence[str] | None = None
) -> MethodResult:
    """A list of layers is fused as in the paper: each relu'd map is min-max normalized,
    scaled by tanh(2·M), resized to the largest map and combined by maximum."""
    layers = [layer] if layer is None or isinstance(layer, str) else list(layer)
    if not layers:
        raise MethodError("layercam needs at least one layer")
    if len(layers) == 1:
        name = layer_name(scan, layers[0])
        raw, extras = layer_cam_map(scan, targets, name, _layercam)
        return cam_result(raw, name, extras)
    names = [layer_name(scan, name) for name in layers]
    maps = [layer_cam_map(scan, targets, name, _layercam)[0].clamp_min(0) for name in names]
    size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    scaled = [torch.tanh(2 * minmax_maps(m)) for m in maps]
    fused = torch.stack([resize_maps(m.unsqueeze(2), tuple(size)) for m in scaled]).amax(dim=0)
    return MethodResult(fused, {"layers": names}, layer=",".join(names))


# -- CAMs of another score: a contrast of classes, a softmax utility --------------------------
@register(
    "finercam",
    family="cam",
    space="layer",
    signed=False,
    description="Finer-CAM: a gradient CAM of the target's logit minus those of the classes "
    "scored most like it, Σ_j p_j (y_c − α y_j) / Σ_j p_j.",
    cost="1 backward per target",
    paper="Zhang et al. 2025, arXiv:2501.11309",
    in_default_scan=False,
    needs_graph=True,
)
def finercam(
    scan: Scan,
    targets: torch.Tensor,
    *,
    layer: str | None = None,
    n_similar: int = 3,
    alpha: float = 1.0,
    base: str = "gradcam",
) -> MethodResult:
    """The compared classes j are the `n_similar` whose logits are closest to the target's;
    p is the softmax, differentiated too (as pytorch-grad-cam's FinerWeightedTarget does).
    `base` names the gradient CAM applied to the contrast's gradients."""
    n_similar = count("n_similar", n_similar)
    alpha = number("alpha", alpha)
    if base not in _COMBINERS:
        raise MethodError(f"base must be one of {', '.join(_COMBINERS)}, got {base!r}")
    layer = layer_name(scan, layer)
    acts = spatial_activations(scan, layer)
    logits = scan.logits
    n_similar = min(n_similar, logits.shape[1] - 1)
    if n_similar < 1:
        raise MethodError("finercam needs a model with at least two classes")
    columns, compared = [], []
    for t in range(targets.shape[1]):
        target = targets[:, t : t + 1]
        distance = (logits.detach() - logits.detach().gather(1, target)).abs()
        distance.scatter_(1, target, float("inf"))  # never compare a class with itself
        similar = distance.topk(n_similar, dim=1, largest=False).indices  # (N, k)
        p = logits.softmax(dim=1).gather(1, similar)
        contrast = (p * (logits.gather(1, target) - alpha * logits.gather(1, similar))).sum(1)
        columns.append(scan.layer_gradients_of(layer, contrast / (p.sum(1) + 1e-9)).detach())
        compared.append(similar)
    grads = torch.stack(columns, dim=1)
    extras = {"compared": torch.stack(compared, dim=1), **unused_targets(grads, targets)}
    return cam_result(_COMBINERS[base](acts, grads), layer, extras)


_UTILITIES = ("rest", "logit")


@register(
    "shapleycam",
    family="cam",
    space="layer",
    signed=False,
    description="Shapley-CAM: channels weighted by the mean of g − ½ H·A (gradient and "
    "Hessian-vector product of the ReST utility 2y_c − logsumexp y).",
    cost="2 backwards per target (one of them second-order)",
    paper="Cai 2025, arXiv:2501.06261",
    needs_graph=True,
)
def shapleycam(
    scan: Scan, targets: torch.Tensor, *, layer: str | None = None, utility: str = "rest"
) -> MethodResult:
    """`utility="rest"` (the paper's) explains y_c + log softmax_c(y); `"logit"` explains
    y_c, whose Hessian is zero through piecewise-linear heads (Shapley-CAM is Grad-CAM there)."""
    if utility not in _UTILITIES:
        raise MethodError(f"utility must be one of {_UTILITIES}, got {utility!r}")
    layer = layer_name(scan, layer)
    acts = spatial_activations(scan, layer)
    graph_acts = scan.activations(layer)
    columns = []
    for t in range(targets.shape[1]):
        score = scan.logits.gather(1, targets[:, t : t + 1]).squeeze(1)
        if utility == "rest":
            score = 2 * score - scan.logits.logsumexp(dim=1)
        grad = scan.layer_gradients_of(layer, score, create_graph=True)
        hvp = None
        if grad.requires_grad:
            (hvp,) = torch.autograd.grad(
                grad, graph_acts, grad_outputs=acts, retain_graph=True, allow_unused=True
            )
        columns.append(grad.detach() if hvp is None else (grad - 0.5 * hvp).detach())
    grads = torch.stack(columns, dim=1)
    return cam_result(_gradcam(acts, grads), layer, unused_targets(grads, targets))


# -- Smooth Grad-CAM++: gradient moments averaged over noisy inputs --------------------------
@register(
    "smoothgradcam_pp",
    family="cam",
    space="layer",
    signed=False,
    description="Smooth Grad-CAM++: Grad-CAM++ with the gradient moments g, g², g³ averaged "
    "over noisy copies of the input.",
    cost="n_samples forwards + n_samples backwards per target",
    paper="Omeiza et al. 2019, arXiv:1908.01224",
    in_default_scan=False,
)
def smoothgradcam_pp(
    scan: Scan,
    targets: torch.Tensor,
    *,
    layer: str | None = None,
    n_samples: int = 25,
    noise_level: float = 0.15,
    seed: int | None = 0,
) -> MethodResult:
    """Noise as in `smoothgrad`: σ = noise_level · (max − min) of each input, ε drawn as
    torch.randn((n_samples, 3, H, W)) from a generator seeded with `seed`. The maps combine
    the moments with the clean image's activations; `noise_level=0` is Grad-CAM++."""
    n_samples = count("n_samples", n_samples)
    noise_level = number("noise_level", noise_level)
    layer = layer_name(scan, layer)
    acts = spatial_activations(scan, layer)
    inputs = scan.inputs
    noise = torch.randn((n_samples, *inputs.shape[1:]), generator=generator(seed))
    points = NoisyInputs(inputs, noise.to(inputs), noise_level * input_span(inputs))
    repeated = targets.repeat_interleave(n_samples, dim=0)
    moments = acts.new_zeros((3, *targets.shape, *acts.shape[1:]), dtype=torch.float64)
    key = ("smoothgradcam_pp", layer, tuple(inputs.shape[1:]), targets.shape[1])
    for rows in scan.batches(len(points), key):
        grads = scan.derive(points[rows], relu_rules=False).layer_gradients(layer, repeated[rows])
        image = torch.arange(len(points), device=acts.device)[rows] // n_samples
        grads = grads.double()
        for p in range(3):
            moments[p].index_add_(0, image, grads ** (p + 1))
    d1, d2, d3 = (m.div(n_samples).to(acts.dtype) for m in moments)
    extras = {"n_samples": n_samples, "noise_level": noise_level, "seed": seed}
    return cam_result(_gradcam_pp_moments(acts, d1, d2, d3), layer, extras)


# -- FullGrad: input-gradient and every bias-gradient ---------------------------------------
def _bias(module: nn.Module) -> torch.Tensor | None:
    """The bias a layer adds per output channel: a convolution's, or an eval-mode
    BatchNorm's b − μ·γ / √(σ² + ε); None for other layers."""
    if isinstance(module, nn.Conv2d):
        return None if module.bias is None else module.bias.detach()
    if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None:
        scale = (module.running_var + module.eps).rsqrt()
        if module.weight is not None:
            scale = scale * module.weight.detach()
        shift = -module.running_mean * scale
        return shift if module.bias is None else shift + module.bias.detach()
    return None


def _rescaled(maps: torch.Tensor) -> torch.Tensor:
    """|m| of each (h, w) map shifted to min 0 and divided by max + 1e-7 (ψ of the paper,
    with pytorch-grad-cam's epsilon)."""
    maps = maps.abs()
    maps = maps - maps.amin(dim=(-2, -1), keepdim=True)
    return maps / (maps.amax(dim=(-2, -1), keepdim=True) + _EPS)


@register(
    "fullgrad",
    family="cam",
    signed=False,
    description="FullGrad: ψ(|x · ∇x|) plus, for every convolution and BatchNorm with a bias, "
    "ψ(|b · ∂y/∂output|) per channel upsampled to the input (ψ: min-max per channel).",
    cost="1 backward per target",
    paper="Srinivas & Fleuret 2019, arXiv:1905.00780",
    in_default_scan=False,
)
def fullgrad(scan: Scan, targets: torch.Tensor) -> MethodResult:
    """The bias gradients of every layer come from the one backward per target that also
    gives the input gradient. Upsampling is linear, so each layer's channels are summed at
    the layer's resolution and the sum upsampled once (bilinear, no corner alignment)."""
    layers, biases = [], []
    for row in scan.layer_table():
        if row.output_shape is None or len(row.output_shape) != 3:
            continue
        bias = _bias(get_module(scan.model.module, LayerRef.parse(row.name).name))
        if bias is not None:
            layers.append(row.name)
            biases.append(bias)
    input_grads, layer_grads = scan.input_and_layer_gradients(targets, layers)
    size = tuple(scan.inputs.shape[-2:])
    total = _rescaled(input_grads * scan.inputs.unsqueeze(1)).sum(dim=2, keepdim=True)
    for bias, grads in zip(biases, layer_grads, strict=True):
        terms = _rescaled(grads * bias.to(grads).view(1, 1, -1, 1, 1))
        total = total + resize_maps(terms.sum(dim=2, keepdim=True), size).to(total.dtype)
    return MethodResult(total, {"bias_layers": len(layers)})


# -- CAM: the classifier's own weights --------------------------------------------------------
@register(
    "cam",
    family="cam",
    space="layer",
    signed=False,
    description="CAM: activations weighted by the linear classifier's weights for the class "
    "(needs global average pooling + one linear layer after the layer).",
    cost="free (no backward)",
    paper="Zhou et al. 2016, arXiv:1512.04150",
)
def cam(scan: Scan, targets: torch.Tensor, *, layer: str | None = None) -> MethodResult:
    layer = layer_name(scan, layer)
    acts = spatial_activations(scan, layer)
    weights = _gap_classifier(scan, acts).detach()[targets]  # (N, T, K)
    return cam_result(weighted_sum(weights.to(acts.dtype), acts), layer)


def _linear_parameters(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (out, in), bias) of an nn.Linear, or of a module that says it computes one
    (`linear_parameters()`, e.g. a Keras Dense layer in cnnscan.models.onnx_keras)."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    get = getattr(module, "linear_parameters", None)
    return get() if callable(get) else None


def _gap_classifier(scan: Scan, acts: torch.Tensor) -> torch.Tensor:
    """The weight (classes, channels) of the linear layer that turns the layer's globally
    averaged activations into the logits, verified on this batch (so CAM never silently uses
    the wrong weights)."""
    pooled = acts.mean(dim=(-2, -1))
    logits = scan.logits.detach()
    for module in reversed(list(scan.model.module.modules())):
        linear = _linear_parameters(module)
        if linear is not None and tuple(linear[0].shape) == (logits.shape[1], acts.shape[1]):
            weight = linear[0].detach().to(pooled.device, pooled.dtype)
            predicted = pooled @ weight.T
            if linear[1] is not None:
                predicted = predicted + linear[1].detach().to(predicted)
            if torch.allclose(predicted, logits, rtol=1e-3, atol=1e-3 * float(logits.abs().max())):
                return linear[0]
    raise MethodError(
        "cam needs the layer to feed global average pooling and then one linear classifier "
        "(logits = W · mean(A) + b), which this layer does not; use gradcam, which equals CAM "
        "up to scale on such networks"
    )


# -- Guided Grad-CAM ---------------------------------------------------------------------------
@register(
    "guided_gradcam",
    family="cam",
    relu_rules=True,
    view="colour",
    description="Guided Grad-CAM: guided backprop × Grad-CAM upsampled to the input.",
    cost="2 backwards per target",
    paper="Selvaraju et al. 2017, arXiv:1610.02391",
)
def guided_gradcam(scan: Scan, targets: torch.Tensor, *, layer: str | None = None) -> MethodResult:
    layer = layer_name(scan, layer)
    raw, extras = layer_cam_map(scan, targets, layer, _gradcam)
    guided = scan.input_gradients(targets, "guided")
    heat = resize_maps(raw.clamp_min(0).unsqueeze(2), tuple(guided.shape[-2:]))
    return MethodResult(guided * heat, extras, layer=layer)
