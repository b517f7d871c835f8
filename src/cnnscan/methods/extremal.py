"""Perturbation family, extremal perturbation: the smooth mask of a given area that keeps
(or removes) the most of the target score when the rest of the image is blurred, found by
gradient descent on the mask's parameters (torchray's `extremal_perturbation`).

Every target of every image is one mask of the same optimization: each step runs one
batched forward and backward (`Scan.iter_gradients`) for all of them, in groups of masks
that fit the memory budget.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cnnscan.errors import MethodError
from cnnscan.methods.ig_blur import blur
from cnnscan.methods.options import count, number
from cnnscan.methods.progress import progress_bar
from cnnscan.methods.registry import MethodResult, register
from cnnscan.optimizers import SGD

if TYPE_CHECKING:
    from cnnscan.scan import Scan

VARIANTS = ("preserve", "delete", "dual")
# torchray's fixed optimization settings: SGD with momentum, the area loss's weight growing
# by 0.35% a step, masks pooled by a softmax of coldness 20
_LEARNING_RATE, _MOMENTUM = 0.01, 0.9
_AREA_WEIGHT, _AREA_GROWTH = 300.0, 1.0035
_COLDNESS = 20.0


class SmoothMasks:
    """torchray's MaskGenerator: a mask on a grid of `step` pixels, each parameter spread by
    a bump of radius ~`sigma`, pooled by a smooth max; masks are (B, 1, H, W) in [0, 1]
    with a margin of `sigma` around the image (`full`) for the area loss."""

    def __init__(self, shape: tuple[int, int], step: int, sigma: float, device):
        self.shape, self.step, self.sigma = shape, step, sigma
        self.padding = 1 + math.ceil(2 * sigma / step)  # margin σ + kernel σ, in steps
        self.radius = 1 + math.ceil(sigma / step)
        self.shape_in = tuple(math.ceil(z / step) for z in shape)
        side = 2 * self.radius + 1
        self.shape_mid = tuple(z + 2 * self.padding - side + 1 for z in self.shape_in)
        self.shape_up = tuple(step * z for z in self.shape_mid)
        out = tuple(z - step + 1 for z in self.shape_up)
        inv = [
            torch.tensor(m / u, dtype=torch.float32)
            for m, u in zip(self.shape_mid, self.shape_up, strict=True)
        ]
        uy = torch.arange(out[0], dtype=torch.float32)[:, None]
        ux = torch.arange(out[1], dtype=torch.float32)[None, :]
        k = torch.arange(side, dtype=torch.float32)
        iy = torch.floor(inv[0] * uy)[None, None] + k[:, None, None, None] - self.padding
        ix = torch.floor(inv[1] * ux)[None, None] + k[None, :, None, None] - self.padding
        delta = torch.sqrt(
            (uy - (sigma + step * iy)) ** 2 + (ux - (sigma + step * ix)) ** 2
        )  # (side, side, H', W'): distance of each pixel to the parameters around it
        bump = torch.exp(-2 * ((delta / sigma - 0.5).clamp(min=0) ** 2))
        self.weight = bump.reshape(1, side * side, *out).to(device)

    def __call__(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cropped (B, 1, H, W), full with margin) masks of parameters (B, 1, *shape_in),
        one mask at a time: its bumps fit the cache, and the smooth max of one mask is
        torchray's to the bit (its softmax rounds differently in a batch), which the area
        loss's sort of tied values needs."""
        side = 2 * self.radius + 1
        bumps = F.unfold(params, (side, side), padding=(self.padding, self.padding))
        bumps = bumps.view(len(params), -1, *self.shape_mid)
        pooled = [_SmoothMax.apply(one, self.weight, self.step) for one in bumps.split(1)]
        mask = torch.cat(pooled).clamp(0, 1)
        m = round(self.sigma)
        return mask[:, :, m : m + self.shape[0], m : m + self.shape[1]], mask


class _SmoothMax(torch.autograd.Function):
    """Σ_k a_k · softmax(20 a)_k over the bumps a = weight · parameter of each pixel of one
    mask, the parameters (1, K, h, w) upsampled by `step` (nearest), with its backward by
    hand, s_k (1 + 20 (a_k − pooled)): a few passes over the bumps where autograd's chain
    through softmax, upsampling and padding makes three times as many."""

    @staticmethod
    def forward(ctx, bumps: torch.Tensor, weight: torch.Tensor, step: int):
        # a written in torchray's layout (its softmax's bits): each parameter row once as
        # `step` rows of the weight, the rows after the last whole block from the next row
        k, h, w = weight.shape[1:]
        rows = bumps.repeat_interleave(step, dim=3)[..., :w]
        dtype = torch.promote_types(bumps.dtype, weight.dtype)
        a = torch.empty(weight.shape, dtype=dtype, device=weight.device)
        whole = h // step * step
        shape = (1, k, whole // step, step, w)
        torch.mul(
            weight[:, :, :whole].view(shape),
            rows[:, :, : whole // step, None],
            out=a[:, :, :whole].view(shape),
        )
        torch.mul(
            weight[:, :, whole:], rows[:, :, whole // step : whole // step + 1], out=a[:, :, whole:]
        )
        scaled = _COLDNESS * a
        s = F.softmax(scaled, dim=1)
        pooled = torch.mul(a, s, out=scaled).sum(dim=1, keepdim=True)  # one buffer fewer
        ctx.step = step
        ctx.save_for_backward(a, s, pooled, weight)
        return pooled

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, s, pooled, weight = ctx.saved_tensors
        grad_a = a - pooled
        torch.addcmul(s, s, grad_a, value=_COLDNESS, out=grad_a)
        grad_a.mul_(grad).mul_(weight)
        # the nearest upsampling's backward: the sum of each step × step block
        return F.avg_pool2d(grad_a, ctx.step, ceil_mode=True, divisor_override=1), None, None


def blur_pyramid(images: torch.Tensor, levels: int, max_blur: float) -> torch.Tensor:
    """(N, L, C, H, W): each image blurred with σ = max_blur · (1 − l / (L − 1)), level L − 1
    the image itself (torchray's Perturbation, its ⌈4σ⌉ kernel with zeros outside)."""
    steps = torch.linspace(0, 1, levels).tolist()
    return torch.stack(
        [blur(images, (1 - s) * max_blur, radius=math.ceil(4 * (1 - s) * max_blur)) for s in steps],
        dim=1,
    )


def perturbed(pyramid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W): at each pixel the pyramid level the mask (B, 1, H, W) points to, linear
    between levels (mask 1: the image, 0: the strongest blur); `pyramid` is (B, L, C, H, W)."""
    levels = pyramid.shape[1]
    w = mask.unsqueeze(1) * (levels - 1)  # (B, 1, 1, H, W)
    k = w.detach().floor()
    w = w - k
    k = k.long().expand(-1, 1, pyramid.shape[2], -1, -1)
    y0 = pyramid.gather(1, k)
    y1 = pyramid.gather(1, (k + 1).clamp(max=levels - 1))
    return ((1 - w) * y0 + w * y1).squeeze(1)


def area_loss(full: torch.Tensor, area: float) -> torch.Tensor:
    """(B,): mean squared distance of each mask's sorted values to a step vector with a
    share `area` of ones (torchray's area constraint, before its weight)."""
    flat = full.flatten(1)
    reference = torch.ones_like(flat)
    reference[:, : int(flat.shape[1] * (1 - area))] = 0
    return ((flat.sort(dim=1)[0] - reference) ** 2).mean(dim=1)


@register(
    "extremal_perturbation",
    family="perturbation",
    signed=False,
    description="Extremal perturbation: the smooth mask of a fixed area that keeps the most "
    "of the target score when the rest of the image is blurred (optimized).",
    cost="max_iter forwards + backwards of a batch of every image's targets",
    paper="Fong, Patrick & Vedaldi 2019, arXiv:1910.08485",
    in_default_scan=False,
)
def extremal_perturbation(
    scan: Scan,
    targets: torch.Tensor,
    *,
    area: float = 0.1,
    max_iter: int = 800,
    step: int = 7,
    sigma: float = 21.0,
    levels: int = 8,
    max_blur: float = 20.0,
    variant: str = "preserve",
    jitter: bool = True,
) -> MethodResult:
    """torchray 1.0.0.2's `extremal_perturbation` with one area and the simple reward (the
    target logit): masks start at all ones, SGD (learning rate 0.01, momentum 0.9) on
    −(reward − 300·1.0035^t · area loss), the parameters clipped to [0, 1] after each step,
    the image flipped left-right on even steps (`jitter`). `variant` "preserve" rewards the
    masked image, "delete" penalizes the image with the mask removed, "dual" both. The
    map is the mask of the last step (in [0, 1], at the input's size)."""
    area = number("area", area, positive=True)
    if area >= 1:
        raise MethodError(
            f"area (the share of the image the mask keeps) must be in (0, 1), got {area}"
        )
    max_iter = count("max_iter", max_iter)
    step = count("step", step)
    sigma = number("sigma", sigma, positive=True)
    levels = count("levels", levels, minimum=2)
    max_blur = number("max_blur", max_blur, positive=True)
    if variant not in VARIANTS:
        raise MethodError(f"variant must be one of {VARIANTS}, got {variant!r}")
    n, t = targets.shape
    inputs = scan.inputs
    masks = SmoothMasks(tuple(inputs.shape[-2:]), step, sigma, inputs.device)
    pyramids = blur_pyramid(inputs, levels, max_blur)
    images = torch.arange(n, device=inputs.device).repeat_interleave(t)
    flat = targets.reshape(-1)
    # what one mask holds during a step: its bumps and their softmax (kept for the
    # backward), its pyramid and perturbed images; the model's forwards batch apart
    side = 2 * masks.radius + 1
    per_mask = 4 * (2 * side * side * math.prod(masks.shape_up) + (levels + 4) * inputs[0].numel())
    key = ("extremal_perturbation", tuple(inputs.shape[1:]), step, sigma, levels)
    groups = list(scan.batches(n * t, key, per_item=per_mask))
    maps = inputs.new_empty((n * t, 1, *inputs.shape[-2:]))
    reward, loss = inputs.new_empty(n * t), inputs.new_empty(n * t)
    total = max_iter * len(groups)
    with progress_bar("extremal_perturbation", total, counted="steps") as bar:
        for rows in groups:
            maps[rows], reward[rows], loss[rows] = _optimize(
                scan,
                masks,
                pyramids[images[rows]],
                flat[rows],
                area,
                max_iter,
                variant,
                jitter,
                bar,
            )
    extras = {
        "area": area,
        "max_iter": max_iter,
        "variant": variant,
        "reward": reward.view(n, t).cpu(),
        "area_loss": loss.view(n, t).cpu(),
        "forwards": max_iter * n * t * (2 if variant == "dual" else 1),
    }
    return MethodResult(maps.view(n, t, 1, *inputs.shape[-2:]), extras)


def _optimize(
    scan: Scan,
    masks: SmoothMasks,
    pyramid: torch.Tensor,
    targets: torch.Tensor,
    area: float,
    max_iter: int,
    variant: str,
    jitter: bool,
    bar: tqdm,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masks (B, 1, H, W), rewards (B,), area losses (B,)) of the last step for B masks
    optimized together, one per pyramid (B, L, C, H, W) and target (B,)."""
    b = len(targets)
    rows = targets.view(-1, 1)
    sign = pyramid.new_full((b,), -1.0 if variant == "delete" else 1.0)
    if variant == "dual":
        rows, sign = torch.cat([rows, rows]), torch.cat([sign, -sign])
    params = pyramid.new_ones((b, 1, *masks.shape_in)).requires_grad_(True)
    optimizer = SGD([params], lr=_LEARNING_RATE, momentum=_MOMENTUM, dampening=_MOMENTUM)
    weight = _AREA_WEIGHT
    for it in range(max_iter):
        cropped, full = masks(params)
        if variant == "preserve":
            x = perturbed(pyramid, cropped)
        elif variant == "delete":
            x = perturbed(pyramid, 1 - cropped)
        else:
            x = torch.cat([perturbed(pyramid, cropped), perturbed(pyramid, 1 - cropped)])
        if jitter and it % 2 == 0:
            x = torch.flip(x, dims=(3,))
        grads, scores = _target_gradients(scan, x.detach(), rows)
        loss = area_loss(full, area)
        optimizer.zero_grad()
        # −(reward − weight · loss): the reward's gradient at x from the batched backward
        torch.autograd.backward(
            [x, loss.sum()], [-sign.view(-1, 1, 1, 1) * grads, loss.new_tensor(weight)]
        )
        optimizer.step()
        with torch.no_grad():
            params.clamp_(0, 1)
        weight *= _AREA_GROWTH
        bar.update()
    reward = (sign * scores).view(-1, b).sum(dim=0)
    return cropped.detach(), reward, loss.detach()


def _target_gradients(
    scan: Scan, x: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d logit / d x (B, C, H, W), logits (B,)) of each row's target, in the scan's batches."""
    grads, scores = x.new_empty(x.shape), x.new_empty(len(x))
    for chunk, g, s in scan.iter_gradients(x, rows):
        grads[chunk], scores[chunk] = g[:, 0], s[:, 0]
    return grads, scores
