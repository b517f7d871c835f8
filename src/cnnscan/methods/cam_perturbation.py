"""CAM family, CAMs that run extra forwards: the input masked by each channel (Score-CAM and
its smoothed and integrated variants SS-CAM, IS-CAM) or the part of the network after the
layer on edited activations (Ablation-CAM, ReciproCAM).

Masked inputs are built chunk by chunk and run through `Scan.logits_at` (measured batches,
BatchNorm folded); head-only forwards run through `Scan.head`, which re-runs only what
depends on the layer. Work whose result is known is skipped exactly (identical masks,
channels that are all zero); the docs say where that changes a convention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from cnnscan.attribution import minmax_maps
from cnnscan.methods.cam import cam_result, layer_name, spatial_activations, weighted_sum
from cnnscan.methods.options import count, generator, number
from cnnscan.methods.progress import progress_bar
from cnnscan.methods.registry import MethodResult, register

if TYPE_CHECKING:
    from cnnscan.scan import Scan


# -- Score-CAM and its variants: channels as input masks -----------------------------------
class _MaskedInputs:
    """scale · x[image] · upsampled mask for each row, built chunk by chunk (hundreds of masks
    at input size never sit in memory at once). Masks are min-max scaled at layer resolution
    and upsampled without corner alignment (torchcam's convention), or with `align_corners`
    upsampled with aligned corners and then scaled (pytorch-grad-cam's)."""

    def __init__(
        self,
        inputs: torch.Tensor,
        image: torch.Tensor,
        maps: torch.Tensor,
        align_corners: bool = False,
        scale: torch.Tensor | None = None,
    ):
        """`maps` (M, 1, h, w) are min-max scaled already; upsampling is affine-equivariant,
        so scaling again after an aligned-corner upsampling equals scaling only after it."""
        self.inputs, self.image, self.maps, self.scale = inputs, image, maps, scale
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
        if self.scale is not None:
            masks = masks * self.scale[rows].view(-1, 1, 1, 1).to(masks)
        return self.inputs[self.image[rows]] * masks


def _distinct_masks(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct min-max scaled channel maps of each image: (maps (U, 1, h, w), owning
    image (U,), index of each channel's map (N·K,)). Constant channels all scale to the
    zero mask; identical channels share a map."""
    n, _, h, w = acts.shape
    scaled = minmax_maps(acts.float()).flatten(2)  # (N, K, hw)
    distinct, owners, inverse = [], [], []
    offset = 0
    for i in range(n):
        unique, index = torch.unique(scaled[i], dim=0, return_inverse=True)
        inverse.append(index + offset)
        offset += len(unique)
        distinct.append(unique)
        owners.append(torch.full((len(unique),), i, device=acts.device))
    return torch.cat(distinct).view(-1, 1, h, w), torch.cat(owners), torch.cat(inverse)


def _softmax_weights(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Channel weights (N, T, K) = softmax over channels of the targets' scores, from scores
    (N, K, classes)."""
    n, k, _ = scores.shape
    per_target = scores.gather(2, targets.unsqueeze(1).expand(n, k, -1))  # (N, K, T)
    return per_target.softmax(dim=1).transpose(1, 2)


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
    layer = layer_name(scan, layer)
    acts = spatial_activations(scan, layer)
    n, k = acts.shape[:2]
    maps, owners, inverse = _distinct_masks(acts)
    masked = _MaskedInputs(scan.inputs, owners, maps, align_corners)
    with progress_bar("scorecam", len(masked), "mask") as bar:
        logits = scan.logits_at(masked, progress=bar.update)
    weights = _softmax_weights(logits[inverse].view(n, k, -1), targets)
    extras = {"forwards": len(masked), "channels": k}
    return cam_result(weighted_sum(weights.to(acts.dtype), acts), layer, extras)


@register(
    "iscam",
    family="cam",
    space="layer",
    signed=False,
    description="IS-CAM: Score-CAM whose channel scores are averaged over the input masked "
    "by the channel at growing strengths c_s = Σ_{j≤s} j/N.",
    cost="n_samples forwards per distinct channel mask",
    paper="Naidu et al. 2020, arXiv:2010.03023",
    in_default_scan=False,
)
def iscam(
    scan: Scan, targets: torch.Tensor, *, layer: str | None = None, n_samples: int = 10
) -> MethodResult:
    """The strengths are torchcam's reading of the paper's integration (c_s accumulates
    s/N, so the last masks are brighter than the image). Distinct masks run once per
    strength; the zero mask gives the same all-zero input at every strength and runs once."""
    n_samples = count("n_samples", n_samples)
    layer = layer_name(scan, layer)
    acts = spatial_activations(scan, layer)
    n, k = acts.shape[:2]
    maps, owners, inverse = _distinct_masks(acts)
    strengths = torch.arange(1, n_samples + 1, dtype=torch.float64).div(n_samples).cumsum(0)
    zero = maps.flatten(1).amax(dim=1) == 0
    repeats = torch.where(zero, 1, n_samples)
    mask_of_row = torch.arange(len(maps), device=maps.device).repeat_interleave(repeats)
    starts = repeats.cumsum(0) - repeats
    step = torch.arange(len(mask_of_row), device=maps.device) - starts[mask_of_row]
    scale = strengths.to(maps.device)[step]
    masked = _MaskedInputs(scan.inputs, owners[mask_of_row], maps[mask_of_row], scale=scale)
    with progress_bar("iscam", len(masked), "mask") as bar:
        logits = scan.logits_at(masked, progress=bar.update)
    mean = logits.new_zeros((len(maps), logits.shape[1])).index_add_(0, mask_of_row, logits)
    mean = mean / repeats.to(mean).unsqueeze(1)
    weights = _softmax_weights(mean[inverse].view(n, k, -1), targets)
    extras = {"forwards": len(masked), "channels": k, "n_samples": n_samples}
    return cam_result(weighted_sum(weights.to(acts.dtype), acts), layer, extras)


_NOISE_CHUNK_BYTES = 64 << 20  # the noise of this many bytes of masks is drawn at once


@register(
    "sscam",
    family="cam",
    space="layer",
    signed=False,
    description="SS-CAM: Score-CAM whose channel scores are averaged over masks with "
    "Gaussian noise added, x · (M_k + δ), δ ~ N(0, σ²) per pixel.",
    cost="n_samples forwards per channel that is not all zero",
    paper="Wang et al. 2020, arXiv:2006.14255",
    in_default_scan=False,
)
def sscam(
    scan: Scan,
    targets: torch.Tensor,
    *,
    layer: str | None = None,
    n_samples: int = 35,
    noise_level: float = 2.0,
    seed: int | None = 0,
) -> MethodResult:
    """Masks as Score-CAM's (torchcam's convention), noise δ of σ = noise_level (the mask's
    range is 1) drawn at input resolution from a generator seeded with `seed`, sample by
    sample and channel by channel (torchcam's order under `torch.manual_seed` for one image),
    shared by every image, so that an image's map does not depend on its batch.
    A channel that is all zero adds nothing to the map; its noise-only scores would only
    enter the softmax's denominator (a positive factor on the whole map), so it is not run:
    the map is the one over the other channels, the same up to that factor."""
    n_samples = count("n_samples", n_samples)
    noise_level = number("noise_level", noise_level)
    layer = layer_name(scan, layer)
    acts = spatial_activations(scan, layer)
    n, k = acts.shape[:2]
    inputs = scan.inputs
    size = tuple(inputs.shape[-2:])
    scaled = minmax_maps(acts.float())
    active = acts.flatten(2).ne(0).any(dim=2)  # (N, K)
    gen = generator(seed)
    chunk = max(1, _NOISE_CHUNK_BYTES // (4 * size[0] * size[1]))
    sums = torch.zeros((n, k, targets.shape[1]), dtype=torch.float64, device=acts.device)
    total = n_samples * int(active.sum())
    with progress_bar("sscam", total, "mask") as bar:
        for _ in range(n_samples):
            for start in range(0, k, chunk):
                channels = torch.arange(start, min(start + chunk, k), device=acts.device)
                noise = noise_level * torch.randn((len(channels), 1, *size), generator=gen)
                for i in range(n):
                    keep = active[i, channels]
                    if not bool(keep.any()):
                        continue
                    chosen = channels[keep]
                    masks = F.interpolate(
                        scaled[i, chosen].unsqueeze(1), size=size, mode="bilinear"
                    ) + noise[keep.cpu()].to(inputs.device)
                    logits = scan.logits_at(inputs[i] * masks.to(inputs.dtype), bar.update)
                    sums[i, chosen] += logits[:, targets[i]].double()
    mean = (sums / n_samples).masked_fill(~active.unsqueeze(2), float("-inf"))
    weights = mean.softmax(dim=1).nan_to_num(0.0).transpose(1, 2)  # (N, T, K)
    extras = {"forwards": total, "channels": k, "n_samples": n_samples}
    return cam_result(weighted_sum(weights.to(acts.dtype), acts), layer, extras)


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
    layer = layer_name(scan, layer)
    acts = spatial_activations(scan, layer)
    n, k = acts.shape[:2]
    weights = acts.new_zeros((n, targets.shape[1], k))
    active = [(acts[i].flatten(1) != 0).any(dim=1).nonzero().flatten() for i in range(n)]
    total = sum(len(a) for a in active)
    per_item = acts[0].numel() * acts.element_size() * 8
    with (
        scan.head(layer) as head,
        progress_bar("ablationcam", total, "channel") as bar,
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
    return cam_result(weighted_sum(weights.to(acts.dtype), acts), layer, extras)


# -- ReciproCAM: one position of the feature map at a time -----------------------------------
@register(
    "reciprocam",
    family="cam",
    space="layer",
    signed=False,
    description="ReciproCAM: the map at each position is the target's softmax probability "
    "when the part after the layer sees only that position's features (the rest zero).",
    cost="1 head-only forward per position of the layer",
    paper="Byun & Lee 2022, arXiv:2209.14074",
)
def reciprocam(scan: Scan, targets: torch.Tensor, *, layer: str | None = None) -> MethodResult:
    """The spatial masks are one-hot (the paper's CNN form and openvino-xai's); maps are the
    probabilities themselves (in [0, 1]), which the paper then min-max normalizes for display."""
    layer = layer_name(scan, layer)
    acts = spatial_activations(scan, layer)
    n, k, h, w = acts.shape
    raw = acts.new_zeros((n, targets.shape[1], h * w))
    per_item = acts[0].numel() * acts.element_size() * 8
    key = ("reciprocam", layer, tuple(acts.shape[1:]))
    with (
        scan.head(layer) as head,
        progress_bar("reciprocam", n * h * w, "position") as bar,
        torch.no_grad(),
    ):
        for i in range(n):
            flat = acts[i].flatten(1)  # (K, hw)
            for chunk in scan.batches(h * w, key, per_item=per_item):
                positions = torch.arange(h * w, device=acts.device)[chunk]
                mosaic = acts.new_zeros((len(positions), k, h * w))
                mosaic[torch.arange(len(positions)), :, positions] = flat[:, positions].T
                rows = torch.full((len(positions),), i, device=acts.device)
                logits = head(mosaic.view(-1, k, h, w), rows)
                raw[i][:, positions] = logits.softmax(dim=1)[:, targets[i]].T.to(raw.dtype)
                bar.update(len(positions))
    extras = {"forwards": n * h * w, "head_only": head.traced}
    return cam_result(raw.view(n, -1, h, w), layer, extras)
