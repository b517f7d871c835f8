"""Superpixels: the interpretable features of LIME and KernelSHAP (and region-based metrics).

A segmentation is an integer label map (H, W) with labels 0..M-1. `segment` computes one per
input with scikit-image (SLIC or quickshift, on the picture as the model sees it), or checks
one the user gives; `coalition_masks` turns rows of on/off features into pixel masks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cnnscan.errors import MethodError

if TYPE_CHECKING:
    from cnnscan.scan import Scan

SEGMENTERS = ("slic", "quickshift")


def superpixels(
    pixels: np.ndarray, method: str = "slic", n_segments: int = 50, seed: int = 0
) -> np.ndarray:
    """Labels 0..M-1 (H, W) of an RGB picture (H, W, 3) in [0, 1].

    SLIC with about `n_segments` superpixels (compactness 10, as scikit-image's default), or
    quickshift with LIME's settings (kernel_size 4, max_dist 200, ratio 0.2), which picks
    the number of segments itself."""
    from skimage.segmentation import quickshift, slic  # scikit-image loads in about a second

    if method == "slic":
        labels = slic(pixels, n_segments=n_segments, compactness=10.0, start_label=0)
    elif method == "quickshift":
        labels = quickshift(
            pixels.astype(np.float64), kernel_size=4, max_dist=200, ratio=0.2, rng=seed
        )
    else:
        raise MethodError(f"segmenter must be one of {SEGMENTERS}, got {method!r}")
    return relabel(labels)


def relabel(labels: np.ndarray) -> np.ndarray:
    """The same regions numbered 0..M-1 (in the order of their original labels)."""
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int64)


def segment(scan: Scan, segments: Any = 50, segmenter: str = "slic", seed: int = 0) -> torch.Tensor:
    """One label map per input of the scan: LongTensor (N, H, W) with labels 0..M_i-1.

    `segments` is a number of superpixels (SLIC) or a label map (H, W) / (N, H, W) of your
    own (any integers; relabelled to 0..M-1)."""
    n, _, height, width = scan.inputs.shape
    if isinstance(segments, torch.Tensor | np.ndarray):
        given = torch.as_tensor(np.asarray(segments))
        if given.is_floating_point() or given.dtype == torch.bool:
            raise MethodError(f"a segments label map must hold integers, got {given.dtype}")
        if given.ndim == 2:
            given = given.expand(n, height, width) if given.shape == (height, width) else given
        if given.ndim != 3 or tuple(given.shape) != (n, height, width):
            raise MethodError(
                f"segments label map has shape {tuple(given.shape)}; it must be ({height}, "
                f"{width}) or ({n}, {height}, {width}), the size of the model input"
            )
        maps = [relabel(m.numpy()) for m in given]
    else:
        if isinstance(segments, bool) or not isinstance(segments, int) or segments < 1:
            raise MethodError(
                f"segments must be a number of superpixels >= 1 or a label map, got {segments!r}"
            )
        if segmenter not in SEGMENTERS:
            raise MethodError(f"segmenter must be one of {SEGMENTERS}, got {segmenter!r}")
        pixels = scan.model.preprocessing.denormalize(scan.inputs.detach()).clamp(0, 1)
        pictures = pixels.permute(0, 2, 3, 1).cpu().double().numpy()
        maps = [superpixels(p, segmenter, segments, seed) for p in pictures]
    return torch.from_numpy(np.stack(maps)).to(scan.inputs.device)


def coalition_masks(coalitions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pixel masks (B, H, W) of coalitions (B, M) of on/off features over labels (H, W)."""
    return coalitions[:, labels]


def segment_means(image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each superpixel filled with its mean colour: (C, H, W) from an image (C, H, W)."""
    count = int(labels.max()) + 1
    flat = labels.flatten()
    sums = image.new_zeros((image.shape[0], count)).index_add_(1, flat, image.flatten(1))
    sizes = torch.bincount(flat, minlength=count).to(image.dtype)
    return (sums / sizes)[:, labels]
