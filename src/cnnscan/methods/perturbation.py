"""Perturbation family: occlusion, RISE, LIME and KernelSHAP.

Each method changes the input many times and reads the model's scores. One batch of
perturbed forwards serves every target. Occlusion runs by incremental inference where the
model traces (each occluded copy is computed only inside the patch's receptive field until
the first global layer, see `cnnscan.engine.incremental`); the others mask the whole image and run
plain forwards in batches of a fixed size (`Scan.logits_at`). LIME and KernelSHAP work on
superpixels (`cnnscan.methods.superpixels`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cnnscan.errors import MethodError
from cnnscan.methods.baselines import make_baseline
from cnnscan.methods.options import count, generator, number, within_budget
from cnnscan.methods.progress import progress_bar
from cnnscan.methods.registry import MethodResult, register
from cnnscan.methods.superpixels import coalition_masks, segment, segment_means

if TYPE_CHECKING:
    from cnnscan.scan import Scan

SPACES = ("probability", "logit")
FILLS = ("zero", "black", "mean", "blur")


# -- shared pieces ------------------------------------------------------------------------------
def _space(space: Any) -> str:
    if space not in SPACES:
        raise MethodError(f"space must be one of {SPACES}, got {space!r}")
    return space


def target_scores(logits: torch.Tensor, targets: torch.Tensor, space: str) -> torch.Tensor:
    """Scores (B, T) of `targets` (B, T) or (T,): logits or softmax probabilities."""
    values = logits.softmax(dim=1) if space == "probability" else logits
    if targets.ndim == 1:
        targets = targets.unsqueeze(0).expand(len(values), -1)
    return values.gather(1, targets)


def fill_values(scan: Scan, fill: Any, extra: tuple[str, ...] = ()) -> torch.Tensor | str:
    """What replaces removed pixels, per image (N, 3, H, W) in model space: a kind from
    `FILLS` (see `make_baseline`), a number (the same value everywhere, in model space),
    a tensor, or one of `extra` (returned as the string for the caller to build)."""
    if isinstance(fill, str) and fill in extra:
        return fill
    if isinstance(fill, int | float) and not isinstance(fill, bool):
        if not math.isfinite(fill):
            raise MethodError(f"fill must be a finite number, got {fill!r}")
        return torch.full_like(scan.inputs, float(fill))
    if isinstance(fill, torch.Tensor) or (isinstance(fill, str) and fill in FILLS):
        return make_baseline(scan, fill)
    kinds = ", ".join((*FILLS, *extra))
    raise MethodError(f"unknown fill {fill!r}; use one of {kinds}, a number or a tensor")


class _Blended:
    """image · m + fill · (1 − m) for masks m built lazily from rows: an input batch built
    chunk by chunk for `Scan.logits_at`."""

    def __init__(
        self,
        image: torch.Tensor,
        fill: torch.Tensor,
        masks: Callable[[slice], torch.Tensor],
        total: int,
    ):
        self.image, self.fill, self.masks, self.total = image, fill, masks, total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, rows: slice) -> torch.Tensor:
        m = self.masks(rows).unsqueeze(1).to(self.image.dtype)
        return self.image * m + self.fill * (1 - m)


# -- occlusion ----------------------------------------------------------------------------------
def _pair(name: str, value: Any) -> tuple[int, int]:
    values = value if isinstance(value, tuple | list) else (value, value)
    if len(values) != 2:
        raise MethodError(f"{name} must be an integer or a pair (height, width), got {value!r}")
    return count(name, values[0]), count(name, values[1])


def _starts(size: int, window: int, stride: int) -> torch.Tensor:
    """captum's window positions: 0, stride, ... until the window reaches the end (the last
    one may stick out and is cut at the border)."""
    return torch.arange(math.ceil((size - window) / stride) + 1) * stride


class _Occluded:
    """The image with window k (row-major over the grid of starts) set to the fill."""

    def __init__(self, image, fill, rows, cols, window):
        self.image, self.fill = image, fill
        self.rows, self.cols, self.window = rows, cols, window

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def grid(self, chunk: slice) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.arange(len(self))[chunk]
        return self.rows[k // len(self.cols)], self.cols[k % len(self.cols)]

    def __getitem__(self, chunk: slice) -> torch.Tensor:
        top, left = (v.to(self.image.device) for v in self.grid(chunk))
        height, width = self.image.shape[-2:]
        ys = torch.arange(height, device=top.device)
        xs = torch.arange(width, device=top.device)
        inside_y = (ys >= top[:, None]) & (ys < top[:, None] + self.window[0])
        inside_x = (xs >= left[:, None]) & (xs < left[:, None] + self.window[1])
        mask = (inside_y[:, :, None] & inside_x[:, None, :]).unsqueeze(1)
        return torch.where(mask, self.fill, self.image)

    def patches(self, chunk: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(top, left, contents (B, 3, h, w)) of each copy's box: the window moved inside
        the image, holding the fill where the (possibly cut) window is, image elsewhere."""
        start_y, start_x = (v.to(self.image.device) for v in self.grid(chunk))
        height, width = self.image.shape[-2:]
        wh, ww = self.window
        top, left = start_y.clamp(max=height - wh), start_x.clamp(max=width - ww)
        rows = top[:, None] + torch.arange(wh, device=top.device)
        cols = left[:, None] + torch.arange(ww, device=top.device)
        inside = (rows >= start_y[:, None])[:, :, None] & (cols >= start_x[:, None])[:, None, :]
        index = (rows[:, :, None], cols[:, None, :])
        image = self.image[0][:, index[0], index[1]].transpose(0, 1)  # (B, 3, wh, ww)
        fill = self.fill[0][:, index[0], index[1]].transpose(0, 1)
        return top, left, torch.where(inside.unsqueeze(1), fill, image)


def _coverage(starts: torch.Tensor, window: int, size: int) -> torch.Tensor:
    """(windows, size) float64: 1 where window i covers position y."""
    ys = torch.arange(size)
    return ((ys >= starts[:, None]) & (ys < starts[:, None] + window)).double()


@register(
    "occlusion",
    family="perturbation",
    description="Occlusion: the drop of the target score when a sliding window is set to the "
    "fill, averaged over the windows covering each pixel.",
    cost="1 forward per window position (only the patch's receptive field where it traces)",
    paper="Zeiler & Fergus 2014, arXiv:1311.2901",
    in_default_scan=False,
)
def occlusion(
    scan: Scan,
    targets: torch.Tensor,
    *,
    window: int | tuple[int, int] = 16,
    stride: int | tuple[int, int] = 8,
    fill: str | float | torch.Tensor = "zero",
    space: str = "probability",
    incremental: bool = True,
) -> MethodResult:
    """captum's Occlusion exactly (same windows, strides and baseline give the same map):
    windows start at 0, stride, ... and the last one in each direction is cut at the border.
    `fill`: "zero" (0 in model space, captum's default), "black", "mean" (the image's mean
    colour), "blur", a number in model space, or a tensor. `incremental=False` runs whole
    forwards instead of incremental inference (same numbers up to float rounding)."""
    space = _space(space)
    wh, ww = _pair("window", window)
    sy, sx = _pair("stride", stride)
    n, _, height, width = scan.inputs.shape
    if wh > height or ww > width:
        raise MethodError(
            f"window {wh}×{ww} is larger than the image {height}×{width}; "
            f"use a window of at most {min(height, width)}"
        )
    if sy > wh or sx > ww:
        raise MethodError(
            f"stride {sy}×{sx} is larger than the window {wh}×{ww}: pixels between windows "
            "would never be occluded; use a stride of at most the window size"
        )
    rows, cols = _starts(height, wh, sy), _starts(width, ww, sx)
    per_image = len(rows) * len(cols)
    per_window = 4 * scan.logits.shape[1] + 16 * targets.shape[1]  # its logits and drops
    within_budget("stride", stride, per_image * per_window, scan.memory_budget)
    fills = fill_values(scan, fill)
    drops = scan.inputs.new_empty((n, per_image, targets.shape[1]))
    used = []
    with progress_bar("occlusion", n * per_image, "window") as bar:
        for i in range(n):
            copies = _Occluded(scan.inputs[i : i + 1], fills[i : i + 1], rows, cols, (wh, ww))
            with scan.patched(i) if incremental else nullcontext() as forward:
                used.append(forward is not None)
                if forward is None:
                    clean = scan.logits.detach()[i : i + 1]
                    logits = scan.logits_at(copies, progress=bar.update)
                else:  # the clean score from the same computation as the occluded ones
                    clean = forward.logits
                    logits = _patched_logits(scan, forward, copies, bar)
            drops[i] = target_scores(clean, targets[i], space) - target_scores(
                logits, targets[i], space
            )
    cover_y = _coverage(rows, wh, height).to(scan.inputs.device)
    cover_x = _coverage(cols, ww, width).to(scan.inputs.device)
    grid = drops.double().view(n, len(rows), len(cols), -1)
    totals = torch.einsum("iy,nijt,jx->ntyx", cover_y, grid, cover_x)
    counts = torch.outer(cover_y.sum(0), cover_x.sum(0))
    maps = (totals / counts).to(scan.inputs.dtype).unsqueeze(2)
    extras = {
        "forwards": n * per_image,
        "windows": (len(rows), len(cols)),
        "incremental": all(used),
        "space": space,
    }
    return MethodResult(maps, extras)


def _patched_logits(scan: Scan, forward, copies: _Occluded, bar: tqdm) -> torch.Tensor:
    """Logits of every occluded copy by incremental inference, in batches of a fixed size of
    groups of `_GROUP` windows (a call has a fixed cost of walking the graph: measured
    batch sizes start at a group, not at one window)."""
    out = []
    key = ("occlusion", tuple(copies.image.shape[1:]), copies.window)
    groups = math.ceil(len(copies) / _GROUP)
    per_group = _GROUP * scan.bytes_per_item // 4
    for chunk in scan.batches(groups, key, per_item=per_group):
        rows = slice(chunk.start * _GROUP, min(chunk.stop * _GROUP, len(copies)))
        out.append(forward(*copies.patches(rows)))
        bar.update(len(out[-1]))
    return torch.cat(out)


_GROUP = 8


# -- RISE ---------------------------------------------------------------------------------------
class _RiseMasks:
    """Random masks of the RISE paper, built lazily: a cell×cell grid of on (probability p)
    / off cells, upsampled bilinearly to (cell + 1) × the cell size and cropped at a random
    shift of up to one cell."""

    def __init__(self, n_masks: int, cell: int, p: float, size: tuple[int, int], seed):
        gen = generator(seed)
        self.size = size
        self.cell_size = (math.ceil(size[0] / cell), math.ceil(size[1] / cell))
        self.up = ((cell + 1) * self.cell_size[0], (cell + 1) * self.cell_size[1])
        self.grid = (torch.rand((n_masks, 1, cell, cell), generator=gen) < p).float()
        self.shift_y = torch.randint(self.cell_size[0], (n_masks,), generator=gen)
        self.shift_x = torch.randint(self.cell_size[1], (n_masks,), generator=gen)

    def __len__(self) -> int:
        return len(self.grid)

    def __call__(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """Masks (B, H, W) in [0, 1] of the masks at `rows`."""
        up = F.interpolate(self.grid[rows], size=self.up, mode="bilinear", align_corners=False)
        ys = self.shift_y[rows][:, None] + torch.arange(self.size[0])
        xs = self.shift_x[rows][:, None] + torch.arange(self.size[1])
        images = torch.arange(len(up))[:, None, None]
        return up[:, 0][images, ys[:, :, None], xs[:, None, :]]


@register(
    "rise",
    family="perturbation",
    signed=False,
    description="RISE: the average of random smooth masks weighted by the target score of "
    "the masked image, Σ score·mask / (N·p).",
    cost="n_masks forwards",
    paper="Petsiuk et al. 2018, arXiv:1806.07421",
    in_default_scan=False,
)
def rise(
    scan: Scan,
    targets: torch.Tensor,
    *,
    n_masks: int = 4000,
    cell: int = 7,
    p: float = 0.5,
    space: str = "probability",
    seed: int | None = 0,
) -> MethodResult:
    """Masked pixels are set to 0 in model space (the dataset mean colour), as the
    reference implementation multiplies the normalized input by the mask. The masks are
    drawn on the CPU from `seed` and shared by every image and target of the call."""
    n_masks = count("n_masks", n_masks)
    cell = count("cell", cell)
    p = number("p", p, positive=True)
    if p > 1:
        raise MethodError(f"p (the probability that a cell is kept) must be in (0, 1], got {p}")
    space = _space(space)
    n, _, height, width = scan.inputs.shape
    if cell > min(height, width):
        raise MethodError(f"cell {cell} is larger than the image {height}×{width}")
    per_mask = 4 * cell * cell + 16 + 4 * scan.logits.shape[1] + 8 * targets.shape[1]
    within_budget("n_masks", n_masks, n_masks * per_mask, scan.memory_budget)
    masks = _RiseMasks(n_masks, cell, p, (height, width), seed)
    device = scan.inputs.device
    maps = torch.zeros((n, targets.shape[1], height * width), dtype=torch.float64, device=device)
    with progress_bar("rise", n * n_masks, "mask") as bar:
        for i in range(n):
            image = scan.inputs[i : i + 1]
            blended = _Blended(
                image, torch.zeros_like(image), lambda rows: masks(rows).to(device), n_masks
            )
            scores = target_scores(scan.logits_at(blended, progress=bar.update), targets[i], space)
            for start in range(0, n_masks, 256):  # Σ score · mask, a few masks at a time
                chunk = slice(start, start + 256)
                flat = masks(chunk).to(device).flatten(1).double()
                maps[i] += scores[chunk].double().T @ flat
    maps = (maps / (n_masks * p)).to(scan.inputs.dtype).view(n, -1, 1, height, width)
    return MethodResult(maps, {"forwards": n * n_masks, "n_masks": n_masks, "space": space})


# -- superpixel surrogates: LIME and KernelSHAP -------------------------------------------------
def _coalition_scores(
    scan: Scan,
    image: int,
    coalitions: torch.Tensor,
    labels: torch.Tensor,
    fill: torch.Tensor,
    targets: torch.Tensor,
    space: str,
    bar: tqdm,
) -> torch.Tensor:
    """Scores (S, T) of the image with the superpixels off in each coalition (S, M) set to
    the fill. Each distinct coalition runs once; the all-on one is the scan's own forward."""
    distinct, inverse = torch.unique(coalitions, dim=0, return_inverse=True)
    everything = distinct.bool().all(dim=1)
    todo = distinct[~everything]
    x = scan.inputs[image : image + 1]
    blended = _Blended(x, fill, lambda rows: coalition_masks(todo[rows], labels), len(todo))
    scores = torch.empty((len(distinct), len(targets)), dtype=x.dtype, device=x.device)
    if len(todo):
        logits = scan.logits_at(blended, progress=bar.update)
        scores[~everything] = target_scores(logits, targets, space)
    scores[everything] = target_scores(scan.logits.detach()[image : image + 1], targets, space)
    return scores[inverse]


def _forwards(coalitions: torch.Tensor) -> int:
    """Forwards `_coalition_scores` runs: distinct coalitions that are not all on."""
    distinct = torch.unique(coalitions, dim=0)
    return int((~distinct.bool().all(dim=1)).sum())


def _coalitions_fit(scan: Scan, n_samples: int, segments: int, targets: torch.Tensor) -> None:
    """The coalitions (a few int64 and float64 copies of n_samples × segments) and their
    scores must fit the memory budget."""
    per_sample = 40 * segments + 4 * scan.logits.shape[1] + 16 * targets.shape[1]
    within_budget("n_samples", n_samples, n_samples * per_sample, scan.memory_budget)


def _surrogate_fill(scan: Scan, fill: Any, labels: torch.Tensor) -> torch.Tensor:
    fills = fill_values(scan, fill, extra=("segment_mean",))
    if isinstance(fills, str):
        return torch.stack([segment_means(x, m) for x, m in zip(scan.inputs, labels, strict=True)])
    return fills


def _paint(weights: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Maps (N, T, 1, H, W): each pixel gets its superpixel's weight."""
    return torch.stack([w[:, m] for w, m in zip(weights, labels, strict=True)]).unsqueeze(2)


def weighted_ridge(
    x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ridge regression with intercept and sample weights (scikit-learn's Ridge):
    (coefficients (M, T), intercepts (T,), weighted R² (T,)), in float64."""
    x, y, w = x.double(), y.double(), weights.double()
    total = w.sum()
    x_mean = (w[:, None] * x).sum(0) / total
    y_mean = (w[:, None] * y).sum(0) / total
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ (w[:, None] * xc) + alpha * torch.eye(x.shape[1], dtype=x.dtype)
    coef = torch.linalg.lstsq(gram, xc.T @ (w[:, None] * yc)).solution
    intercept = y_mean - x_mean @ coef
    residual = (w[:, None] * (y - x @ coef - intercept) ** 2).sum(0)
    spread = (w[:, None] * yc**2).sum(0)
    r2 = torch.where(spread > 0, 1 - residual / spread.clamp_min(1e-300), 1.0)
    return coef, intercept, r2


_DISTANCES = ("cosine", "hamming")


def lime_kernel(coalitions: torch.Tensor, width: float, distance: str) -> torch.Tensor:
    """LIME's sample weights sqrt(exp(−d² / width²)), d the distance of each coalition to
    the all-on one: cosine (1 − cos, 1 for the empty coalition) or hamming (share off)."""
    on = coalitions.double().sum(dim=1)
    m = coalitions.shape[1]
    cosine = torch.where(on > 0, 1 - torch.sqrt(on / m), 1.0)
    d = cosine if distance == "cosine" else (m - on) / m
    return torch.sqrt(torch.exp(-(d**2) / width**2))


@register(
    "lime",
    family="perturbation",
    description="LIME: a weighted ridge surrogate over superpixels switched on/off; a "
    "pixel's value is its superpixel's coefficient.",
    cost="n_samples forwards",
    paper="Ribeiro et al. 2016, arXiv:1602.04938",
    in_default_scan=False,
)
def lime(
    scan: Scan,
    targets: torch.Tensor,
    *,
    n_samples: int = 1000,
    segments: int | torch.Tensor | np.ndarray = 50,
    segmenter: str = "slic",
    kernel_width: float = 0.25,
    distance: str = "cosine",
    alpha: float = 1.0,
    fill: str | float | torch.Tensor = "segment_mean",
    space: str = "probability",
    seed: int = 0,
) -> MethodResult:
    """As the `lime` package's image explainer: coalitions drawn with
    numpy.random.RandomState(seed).randint(0, 2) (the first one all on), removed superpixels
    filled with their mean colour ("segment_mean", lime's default) or any `fill`, cosine
    distance, kernel width 0.25, Ridge(alpha=1) on the target probabilities."""
    n_samples = count("n_samples", n_samples)
    kernel_width = number("kernel_width", kernel_width, positive=True)
    alpha = number("alpha", alpha)
    if distance not in _DISTANCES:
        raise MethodError(f"distance must be one of {_DISTANCES}, got {distance!r}")
    space = _space(space)
    labels = segment(scan, segments, segmenter, seed)
    counts = [int(m.max()) + 1 for m in labels]
    _coalitions_fit(scan, n_samples, max(counts), targets)
    fills = _surrogate_fill(scan, fill, labels)
    coalitions = []
    for m in counts:
        drawn = np.random.RandomState(seed).randint(0, 2, n_samples * m).reshape(n_samples, m)
        drawn[0] = 1
        coalitions.append(torch.from_numpy(drawn).to(scan.inputs.device))
    weights, intercepts, scores_r2 = [], [], []
    with progress_bar("lime", sum(_forwards(z) for z in coalitions), "sample") as bar:
        for i, z in enumerate(coalitions):
            y = _coalition_scores(scan, i, z, labels[i], fills[i : i + 1], targets[i], space, bar)
            kernel = lime_kernel(z, kernel_width, distance)
            coef, intercept, r2 = weighted_ridge(z, y, kernel, alpha)
            weights.append(coef.T.to(scan.inputs.dtype))
            intercepts.append(intercept)
            scores_r2.append(r2)
    extras = {
        "segments": labels.cpu().numpy(),  # (N, H, W) label maps (kept out of summaries)
        "weights": [w.cpu() for w in weights],
        "intercept": torch.stack(intercepts).cpu(),
        "r2": torch.stack(scores_r2).cpu(),
        "forwards": bar.total,
        "space": space,
    }
    return MethodResult(_paint(weights, labels), extras)


def shapley_kernel(m: int, sizes: torch.Tensor) -> torch.Tensor:
    """The Shapley kernel (M − 1) / (C(M, s) · s · (M − s)) for coalition sizes 0 < s < M."""
    s = sizes.double()
    log_binom = math.lgamma(m + 1) - torch.lgamma(s + 1) - torch.lgamma(m - s + 1)
    return (m - 1) / (torch.exp(log_binom) * s * (m - s))


def _shap_coalitions(m: int, n_samples: int, gen: torch.Generator) -> tuple[torch.Tensor, bool]:
    """(coalitions (S, M), exact): every coalition but the empty and full ones if they fit
    in `n_samples` (the regression then gives the exact Shapley values), else sizes drawn in
    proportion to the kernel's mass per size, each with its complement (paired sampling)."""
    if m < 31 and 2**m - 2 <= n_samples:
        codes = torch.arange(1, 2**m - 1)
        return ((codes[:, None] >> torch.arange(m)) & 1).to(torch.int64), True
    sizes = torch.arange(1, m)
    mass = (m - 1) / (sizes * (m - sizes)).double()
    half = max(1, n_samples // 2)
    drawn = sizes[torch.multinomial(mass, half, replacement=True, generator=gen)]
    order = torch.rand((half, m), generator=gen).argsort(dim=1)
    z = (order < drawn[:, None]).to(torch.int64)
    return torch.cat([z, 1 - z]), False


@register(
    "kernel_shap",
    family="perturbation",
    description="KernelSHAP: Shapley values of superpixels by Shapley-kernel weighted "
    "regression, constrained to sum to f(x) − f(baseline).",
    cost="n_samples forwards",
    paper="Lundberg & Lee 2017, arXiv:1705.07874",
    in_default_scan=False,
)
def kernel_shap(
    scan: Scan,
    targets: torch.Tensor,
    *,
    n_samples: int = 1000,
    segments: int | torch.Tensor | np.ndarray = 50,
    segmenter: str = "slic",
    fill: str | float | torch.Tensor = "mean",
    space: str = "logit",
    seed: int = 0,
) -> MethodResult:
    """With 2^M − 2 ≤ n_samples every coalition runs, weighted by the Shapley kernel, and
    the result is the exact Shapley value of each superpixel; otherwise coalitions are
    sampled (sizes in proportion to the kernel, paired with their complements) and
    weighted equally. Σ weights = f(x) − f(baseline) holds exactly in both cases (the
    regression is solved under that constraint); the baseline is the image with every
    superpixel set to `fill` (default: the image's mean colour)."""
    n_samples = count("n_samples", n_samples)
    space = _space(space)
    labels = segment(scan, segments, segmenter, seed)
    _coalitions_fit(scan, n_samples, int(labels.max()) + 1, targets)
    fills = _surrogate_fill(scan, fill, labels)
    gen = generator(seed)
    plans = [_shap_coalitions(int(m.max()) + 1, n_samples, gen) for m in labels]
    device = scan.inputs.device
    weights, bases, errors = [], [], []
    total = sum(_forwards(z) + 1 for z, _ in plans)  # + the baseline
    with progress_bar("kernel_shap", total, "sample") as bar:
        for i, (z, exact) in enumerate(plans):
            z = z.to(device)
            empty = torch.zeros((1, z.shape[1]), dtype=z.dtype, device=device)
            y = _coalition_scores(
                scan, i, torch.cat([empty, z]), labels[i], fills[i : i + 1], targets[i], space, bar
            ).double()
            base, y = y[0], y[1:]
            full = target_scores(scan.logits.detach()[i : i + 1], targets[i], space)[0].double()
            kernel = shapley_kernel(z.shape[1], z.sum(dim=1)) if exact else None
            phi = _constrained_regression(z.double(), y - base, full - base, kernel)
            weights.append(phi.T.to(scan.inputs.dtype))
            bases.append(base.to(scan.inputs.dtype))
            errors.append(phi.sum(dim=0) - (full - base))
    extras = {
        "segments": labels.cpu().numpy(),  # (N, H, W) label maps (kept out of summaries)
        "weights": [w.cpu() for w in weights],
        "base_value": torch.stack(bases).cpu(),
        "sum_error": torch.stack(errors).cpu(),
        "exact": all(exact for _, exact in plans),
        "forwards": total,
        "space": space,
    }
    return MethodResult(_paint(weights, labels), extras)


def _constrained_regression(
    z: torch.Tensor, y: torch.Tensor, total: torch.Tensor, kernel: torch.Tensor | None
) -> torch.Tensor:
    """φ (M, T) minimizing Σ k_i (y_i − z_i·φ)² subject to Σ_j φ_j = total (T,)."""
    w = kernel if kernel is not None else torch.ones(len(z), dtype=z.dtype, device=z.device)
    gram = z.T @ (w[:, None] * z)
    rhs = z.T @ (w[:, None] * y)
    ones = torch.ones((z.shape[1], 1), dtype=z.dtype, device=z.device)
    # KKT system [[A, 1], [1ᵀ, 0]] [φ; λ] = [b; total]; least squares if A is singular.
    kkt = torch.cat(
        [torch.cat([gram, ones], dim=1), torch.cat([ones.T, ones.new_zeros((1, 1))], dim=1)]
    )
    rhs = torch.cat([rhs, total[None, :]])
    return torch.linalg.lstsq(kkt, rhs, driver="gelsd").solution[:-1]


# -- superpixel ablation: feature ablation and Shapley value sampling ----------------------------
@register(
    "feature_ablation",
    family="perturbation",
    description="Feature ablation: the drop of the target score when one superpixel is set "
    "to the fill, painted over it.",
    cost="1 forward per superpixel",
    paper="Zeiler & Fergus 2014, arXiv:1311.2901 (occlusion by regions); captum FeatureAblation",
    in_default_scan=False,
)
def feature_ablation(
    scan: Scan,
    targets: torch.Tensor,
    *,
    segments: int | torch.Tensor | np.ndarray = 50,
    segmenter: str = "slic",
    fill: str | float | torch.Tensor = "zero",
    space: str = "logit",
) -> MethodResult:
    """captum's FeatureAblation with the superpixels as its feature mask: f(x) − f(x with
    superpixel j set to `fill`) for every j. `fill` "zero" (0 in model space) is captum's
    default baseline; `space` "logit" is what captum differentiates, the model's output.
    Deterministic: quickshift segments with its seed 0."""
    space = _space(space)
    labels = segment(scan, segments, segmenter)
    fills = _surrogate_fill(scan, fill, labels)
    device = scan.inputs.device
    weights = []
    total = sum(int(m.max()) + 1 for m in labels)
    with progress_bar("feature_ablation", total, "segment") as bar:
        for i, m in enumerate(labels):
            count_i = int(m.max()) + 1
            one_off = 1 - torch.eye(count_i, dtype=torch.int64, device=device)
            y = _coalition_scores(scan, i, one_off, m, fills[i : i + 1], targets[i], space, bar)
            full = target_scores(scan.logits.detach()[i : i + 1], targets[i], space)
            weights.append((full - y).T.to(scan.inputs.dtype))
    extras = {
        "segments": labels.cpu().numpy(),
        "weights": [w.cpu() for w in weights],
        "forwards": total,
        "space": space,
    }
    return MethodResult(_paint(weights, labels), extras)


@register(
    "shapley_sampling",
    family="perturbation",
    description="Shapley value sampling: each superpixel's mean marginal contribution over "
    "random orders of switching them on, from the fill to the image.",
    cost="n_permutations × superpixels forwards",
    paper="Castro et al. 2009, doi:10.1016/j.cor.2008.04.004; Štrumbelj & Kononenko 2010",
    in_default_scan=False,
)
def shapley_sampling(
    scan: Scan,
    targets: torch.Tensor,
    *,
    n_permutations: int = 25,
    segments: int | torch.Tensor | np.ndarray = 50,
    segmenter: str = "slic",
    fill: str | float | torch.Tensor = "zero",
    space: str = "logit",
    seed: int = 0,
) -> MethodResult:
    """captum's ShapleyValueSampling with the superpixels as its feature mask: the orders are
    torch.randperm(M, generator=Generator().manual_seed(seed)), the same as captum's after
    torch.manual_seed(seed). Every coalition runs once however many orders share it; Σ weights
    = f(x) − f(fill) exactly for every number of orders."""
    n_permutations = count("n_permutations", n_permutations)
    space = _space(space)
    labels = segment(scan, segments, segmenter, seed)
    fills = _surrogate_fill(scan, fill, labels)
    device = scan.inputs.device
    plans = []
    for m in labels:
        gen = generator(seed)
        count_m = int(m.max()) + 1
        orders = torch.stack(
            [torch.randperm(count_m, generator=gen) for _ in range(n_permutations)]
        )
        rank = orders.argsort(dim=1)  # rank[k, j]: the step at which order k switches j on
        steps = torch.arange(count_m + 1)
        prefixes = (rank[:, None, :] < steps[None, :, None]).to(torch.int64)  # (P, M + 1, M)
        plans.append((orders, prefixes.reshape(-1, count_m)))
    weights, errors = [], []
    total = sum(_forwards(z) for _, z in plans)
    with progress_bar("shapley_sampling", total, "coalition") as bar:
        for i, (orders, z) in enumerate(plans):
            count_i = orders.shape[1]
            y = _coalition_scores(
                scan, i, z.to(device), labels[i], fills[i : i + 1], targets[i], space, bar
            ).double()
            y = y.reshape(n_permutations, count_i + 1, -1)
            gains = y[:, 1:] - y[:, :-1]  # (P, M, T): the gain of the feature added at step s
            phi = torch.zeros((count_i, y.shape[-1]), dtype=torch.float64, device=device)
            phi.index_add_(0, orders.flatten().to(device), gains.reshape(-1, y.shape[-1]))
            phi /= n_permutations
            weights.append(phi.T.to(scan.inputs.dtype))
            errors.append(phi.sum(dim=0) - (y[0, -1] - y[0, 0]))
    extras = {
        "segments": labels.cpu().numpy(),
        "weights": [w.cpu() for w in weights],
        "sum_error": torch.stack(errors).cpu(),
        "forwards": total,
        "n_permutations": n_permutations,
        "space": space,
    }
    return MethodResult(_paint(weights, labels), extras)
