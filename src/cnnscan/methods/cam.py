"""CAM family: class activation maps at a layer, from the scan's shared forward.

Every method here combines the layer's activations A (N, K, h, w) into one map per target.
The gradient CAMs differ only in how they weigh A with the gradients g of the target logit
w.r.t. A (taken once per target from the shared forward, through the part of the network
after the layer); Score-CAM and Ablation-CAM run extra forwards, Ablation-CAM only through
the part after the layer. Maps are relu'd; the raw map is kept in `extras["raw"]`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cnnscan.attribution import minmax_maps, resize_maps
from cnnscan.errors import LayerError, MethodError
from cnnscan.methods.registry import MethodResult, register

if TYPE_CHECKING:
    from cnnscan.scan import Scan

_EPS = 1e-7


def _layer_name(scan: Scan, layer: str | None) -> str:
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


def _combine(weights: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """Σ_k w[n, t, k] · A[n, k]: (N, T, h, w)."""
    return torch.einsum("ntk,nkhw->nthw", weights, acts)


def _result(raw: torch.Tensor, layer: str, extras: dict[str, Any] | None = None) -> MethodResult:
    """Relu'd maps (N, T, 1, h, w) with the raw map kept in extras."""
    raw = raw.unsqueeze(2)
    return MethodResult(raw.clamp_min(0), {"raw": raw, **(extras or {})}, layer=layer)


def _unused_targets(grads: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """Say so when a target's logit does not depend on the layer (its map is all zeros)."""
    dead = (grads.flatten(2) == 0).all(dim=2)  # (N, T)
    if not bool(dead.any()):
        return {}
    classes = sorted({int(c) for c in targets[dead].tolist()})
    return {"warning": f"class(es) {classes} do not depend on this layer: their maps are zero"}


# -- gradient CAMs: each says only how it weighs activations with gradients -----------------
GradCombiner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _gradcam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    return _combine(grads.mean(dim=(-2, -1)), acts)


def _gradcam_pp(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    g2 = grads * grads
    total = acts.sum(dim=(-2, -1), keepdim=True).unsqueeze(1)  # Σ_ab A_k(a, b)
    alpha = torch.where(grads != 0, g2 / (2 * g2 + total * g2 * grads + 1e-6), 0.0)
    return _combine((alpha * grads.clamp_min(0)).sum(dim=(-2, -1)), acts)


def _xgradcam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    share = acts / (acts.sum(dim=(-2, -1), keepdim=True) + _EPS)
    return _combine((grads * share.unsqueeze(1)).sum(dim=(-2, -1)), acts)


def _hirescam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    return (grads * acts.unsqueeze(1)).sum(dim=2)


def _layercam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    return (grads.clamp_min(0) * acts.unsqueeze(1)).sum(dim=2)


def layer_cam_map(scan: Scan, targets: torch.Tensor, layer: str, combine: GradCombiner):
    """(raw map (N, T, h, w), extras) of a gradient CAM at one layer."""
    acts = spatial_activations(scan, layer)
    grads = scan.layer_gradients(layer, targets)
    return combine(acts, grads), _unused_targets(grads, targets)


def _register_gradient_cam(name: str, combine: GradCombiner, **info: Any) -> None:
    def method(scan: Scan, targets: torch.Tensor, *, layer: str | None = None) -> MethodResult:
        layer = _layer_name(scan, layer)
        raw, extras = layer_cam_map(scan, targets, layer, combine)
        return _result(raw, layer, extras)

    method.__doc__ = info["description"]
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
        name = _layer_name(scan, layers[0])
        raw, extras = layer_cam_map(scan, targets, name, _layercam)
        return _result(raw, name, extras)
    names = [_layer_name(scan, name) for name in layers]
    maps = [layer_cam_map(scan, targets, name, _layercam)[0].clamp_min(0) for name in names]
    size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    scaled = [torch.tanh(2 * minmax_maps(m)) for m in maps]
    fused = torch.stack([resize_maps(m.unsqueeze(2), tuple(size)) for m in scaled]).amax(dim=0)
    return MethodResult(fused, {"layers": names}, layer=",".join(names))


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
    layer = _layer_name(scan, layer)
    acts = spatial_activations(scan, layer)
    weights = _gap_classifier(scan, acts).detach()[targets]  # (N, T, K)
    return _result(_combine(weights.to(acts.dtype), acts), layer)


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


# -- Eigen-CAM: the first principal component, no target needed ---------------------------
@register(
    "eigencam",
    family="cam",
    space="layer",
    signed=False,
    description="Eigen-CAM: projection of the activations on their first principal "
    "component (class-agnostic: the same map for every target).",
    cost="one SVD per image",
    paper="Muhammad & Yeasin 2020, arXiv:2008.00299",
)
def eigencam(scan: Scan, targets: torch.Tensor, *, layer: str | None = None) -> MethodResult:
    """Sign convention (SVD leaves it open): flipped so that the largest magnitude is
    positive, as in Seg-Eigen-CAM (Chung & Ying 2025, eq. 13)."""
    layer = _layer_name(scan, layer)
    acts = spatial_activations(scan, layer)
    n, _, h, w = acts.shape
    flat = acts.flatten(2).transpose(1, 2).double()  # (N, hw, K)
    centred = flat - flat.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projection = (centred @ vh[:, 0, :].unsqueeze(-1)).squeeze(-1)  # (N, hw)
    flip = projection.amin(dim=1).abs() > projection.amax(dim=1).abs()
    projection = torch.where(flip.unsqueeze(1), -projection, projection)
    raw = projection.to(acts.dtype).view(n, 1, h, w).expand(n, targets.shape[1], h, w)
    return _result(raw, layer)


# -- Score-CAM: channels as input masks -------------------------------------------------------
class _MaskedInputs:
    """x[image] · upsampled mask, built chunk by chunk (hundreds of masks at input size
    never sit in memory at once). Masks are min-max scaled at layer resolution and upsampled
    without corner alignment (torchcam's convention), or with `align_corners` upsampled
    with aligned corners and then scaled (pytorch-grad-cam's)."""

    def __init__(
        self, inputs: torch.Tensor, image: torch.Tensor, maps: torch.Tensor, align_corners: bool
    ):
        """`maps` (M, 1, h, w) are min-max scaled already; upsampling is affine-equivariant,
        so scaling again after an aligned-corner upsampling equals scaling only after it."""
        self.inputs, self.image, self.maps = inputs, image, maps
        self.align_corners = align_corners

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        size = tuple(self.inputs.shape[-2:])
        masks = F.interpolate(
            self.maps[rows], size=size, mode="bilinear", align_corners=self.align_corners
        )
        if self.align_corners:
            masks = minmax_maps(masks)
        return self.inputs[self.image[rows]] * masks


@register(
    "scorecam",
    family="cam",
    space="layer",
    signed=False,
    description="Score-CAM: each channel, upsampled and min-max scaled, masks the input; "
    "channel weights are the softmax over channels of the masked inputs' target logits.",
    cost="1 forward per distinct channel mask",
    paper="Wang et al. 2020, arXiv:1910.01279",
    in_default_scan=False,
)
def scorecam(
    scan: Scan, targets: torch.Tensor, *, layer: str | None = None, align_corners: bool = False
) -> MethodResult:
    """One set of masked forwards serves every target. Work whose result is known is
    skipped exactly: constant channels all give the same (all-zero) mask and identical
    channel maps the same scores, so each distinct mask runs once. `align_corners=True`
    builds the masks as pytorch-grad-cam does (the default is torchcam's way)."""
    layer = _layer_name(scan, layer)
    acts = spatial_activations(scan, layer)
    n, k, h, w = acts.shape
    # Channels that scale to the same mask (all constant ones give zero) run once.
    scaled = minmax_maps(acts.float()).flatten(2)  # (N, K, hw)
    distinct, owners, inverse = [], [], []
    offset = 0
    for i in range(n):
        unique, index = torch.unique(scaled[i], dim=0, return_inverse=True)
        inverse.append(index + offset)
        offset += len(unique)
        distinct.append(unique)
        owners.append(torch.full((len(unique),), i, device=acts.device))
    maps = torch.cat(distinct).view(-1, 1, h, w)
    masked = _MaskedInputs(scan.inputs, torch.cat(owners), maps, align_corners)
    with tqdm(
        total=len(masked),
        desc=f"scorecam: {len(masked)} forwards",
        disable=None,
        leave=False,
        unit="mask",
    ) as bar:
        logits = scan.logits_at(masked, progress=bar.update)
    scores = logits[torch.cat(inverse)].view(n, k, -1)  # (N, K, classes)
    per_target = scores.gather(2, targets.unsqueeze(1).expand(n, k, -1))  # (N, K, T)
    weights = per_target.softmax(dim=1).transpose(1, 2)  # softmax over channels
    extras = {"forwards": len(masked), "channels": k}
    return _result(_combine(weights.to(acts.dtype), acts), layer, extras)


# -- Ablation-CAM: the drop in the logit when a channel is removed ---------------------------
@register(
    "ablationcam",
    family="cam",
    space="layer",
    signed=False,
    description="Ablation-CAM: channel weight = relative drop of the target logit when the "
    "channel is set to zero, (y − y_k) / y.",
    cost="1 head-only forward per non-zero channel",
    paper="Desai & Ramaswamy 2020, WACV",
)
def ablationcam(scan: Scan, targets: torch.Tensor, *, layer: str | None = None) -> MethodResult:
    """Only the part of the network after the layer re-runs (the layer's output is
    captured once); channels that are already all zero are skipped (their ablation
    changes nothing, weight 0)."""
    layer = _layer_name(scan, layer)
    acts = spatial_activations(scan, layer)
    n, k = acts.shape[:2]
    weights = acts.new_zeros((n, targets.shape[1], k))
    active = [(acts[i].flatten(1) != 0).any(dim=1).nonzero().flatten() for i in range(n)]
    total = sum(len(a) for a in active)
    per_item = acts[0].numel() * acts.element_size() * 8
    with (
        scan.head(layer) as head,
        tqdm(
            total=total,
            desc=f"ablationcam: {total} head forwards",
            disable=None,
            leave=False,
            unit="channel",
        ) as bar,
        torch.no_grad(),
    ):
        for i in range(n):
            rows = torch.full((1,), i, device=acts.device)
            base = head(acts[i : i + 1], rows)[0, targets[i]]  # (T,)
            key = ("ablationcam", layer, tuple(acts.shape[1:]))
            for chunk in scan.batches(len(active[i]), key, per_item=per_item):
                channels = active[i][chunk]
                edited = acts[i].repeat(len(channels), 1, 1, 1)
                edited[torch.arange(len(channels), device=acts.device), channels] = 0
                ablated = head(edited, rows.expand(len(channels)))[:, targets[i]]  # (B, T)
                weights[i][:, channels] = ((base - ablated) / base).T
                bar.update(len(channels))
    extras = {"forwards": total, "head_only": head.traced, "channels": k}
    return _result(_combine(weights.to(acts.dtype), acts), layer, extras)


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
    layer = _layer_name(scan, layer)
    raw, extras = layer_cam_map(scan, targets, layer, _gradcam)
    guided = scan.input_gradients(targets, "guided")
    heat = resize_maps(raw.clamp_min(0).unsqueeze(2), tuple(guided.shape[-2:]))
    return MethodResult(guided * heat, extras, layer=layer)
