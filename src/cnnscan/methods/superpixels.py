"""Superpixels: the interpretable features of LIME and KernelSHAP (and region-based metrics),
and XRAI's overlapping multi-scale regions.

A segmentation is an integer label map (H, W) with labels 0..M-1. `segment` computes one per
input with scikit-image (SLIC or quickshift, on the picture as the model sees it), or checks
one the user gives; `coalition_masks` turns rows of on/off features into pixel masks;
`felzenszwalb_masks` makes XRAI's regions as boolean masks (they overlap).
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


FELZENSZWALB_SCALES = (50, 100, 150, 250, 500, 1200)  # PAIR saliency's XRAI settings


def felzenszwalb_masks(image: np.ndarray, dilation: int = 5) -> torch.Tensor:
    """XRAI's regions of an image (H, W, C) as PAIR saliency 0.2.1 makes them: the image
    scaled to [-1, 1] and resized to 224 × 224, Felzenszwalb's segmentation at six scales (σ
    0.8, min size 150), the label maps resized back; each label of each scale one mask,
    dilated by a disk of radius `dilation`. Masks (M, H, W), scale by scale, label order."""
    from skimage.segmentation import felzenszwalb
    from skimage.transform import resize

    shape = image.shape[:2]
    scaled = (image - image.min()) / (image.max() - image.min()) * 2.0 + -1.0
    scaled = resize(
        scaled, (224, 224), order=3, mode="constant", preserve_range=True, anti_aliasing=True
    )
    masks = []
    for scale in FELZENSZWALB_SCALES:
        labels = felzenszwalb(scaled, scale=scale, sigma=0.8, min_size=150)
        labels = resize(
            labels, shape, order=0, preserve_range=True, mode="constant", anti_aliasing=False
        ).astype(int)
        masks.append(dilated_masks(torch.from_numpy(labels - labels.min()), dilation))
    return torch.cat(masks)


def dilated_masks(labels: torch.Tensor, radius: int) -> torch.Tensor:
    """One mask per label 0..max of a label map (H, W), each dilated by a disk of `radius`
    (x² + y² <= radius², scikit-image's `disk`): pixel p is in label l's mask when a pixel
    of label l lies within the disk around p. (L, H, W) bool, one scatter a disk offset."""
    height, width = labels.shape
    count = int(labels.max()) + 1
    outside = count  # the label of the padding: a scratch mask, dropped at the end
    masks = torch.zeros((count + 1) * height * width, dtype=torch.bool)
    padded = torch.nn.functional.pad(labels, (radius,) * 4, value=outside)
    pixels = torch.arange(height * width).view(height, width)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                near = padded[radius + dy : radius + dy + height, radius + dx : radius + dx + width]
                masks[near * (height * width) + pixels] = True
    return masks.view(count + 1, height, width)[:count]
