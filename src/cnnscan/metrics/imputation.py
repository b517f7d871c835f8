"""Noisy linear imputation (Rong et al. 2022, ROAD, arXiv:2202.00449): removed pixels take the
weighted mean of their eight neighbours (edges 1/6, corners 1/12, only neighbours inside the
image), solved jointly for all removed pixels as one sparse linear system per image, plus
Gaussian noise. Unlike a constant fill, the removed shape leaves no trace the model could
read ("the mask leaks the class"), so a score drop is the information removed.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from scipy.sparse import coo_matrix, csr_matrix, diags
from scipy.sparse.linalg import spsolve

NEIGHBOURS = (
    ((1, 1), 1 / 12),
    ((0, 1), 1 / 6),
    ((-1, 1), 1 / 12),
    ((1, -1), 1 / 12),
    ((0, -1), 1 / 6),
    ((-1, -1), 1 / 12),
    ((1, 0), 1 / 6),
    ((-1, 0), 1 / 6),
)


@lru_cache(maxsize=8)
def neighbour_weights(h: int, w: int) -> csr_matrix:
    """The (H·W, H·W) weights of every pixel's neighbours inside an H×W image."""
    rows, cols, values = [], [], []
    y, x = np.divmod(np.arange(h * w), w)
    for (dy, dx), weight in NEIGHBOURS:
        inside = (y + dy >= 0) & (y + dy < h) & (x + dx >= 0) & (x + dx < w)
        source = np.flatnonzero(inside)
        rows.append(source)
        cols.append(source + dy * w + dx)
        values.append(np.full(len(source), weight))
    weights = coo_matrix(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))), shape=(h * w, h * w)
    )
    return weights.tocsr()


def impute(image: torch.Tensor, removed: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """`image` (C, H, W) with the pixels where `removed` (H, W) is True replaced by the
    linear imputation of their neighbours (every channel alike) plus `noise` (C, K) for the
    K removed pixels in row-major order (None: no noise)."""
    c, h, w = image.shape
    flat = image.detach().reshape(c, h * w).cpu().double().numpy()
    gone = np.flatnonzero(removed.cpu().numpy().ravel())
    if len(gone) == 0:
        return image.clone()
    kept = np.ones(h * w, dtype=bool)
    kept[gone] = False
    weights = neighbour_weights(h, w)
    block = weights[gone]
    system = diags(np.asarray(block.sum(axis=1)).ravel()) - block[:, gone]
    right = block[:, np.flatnonzero(kept)] @ flat[:, kept].T  # (K, C)
    solved = spsolve(system.tocsc(), right).reshape(len(gone), c).T
    if noise is not None:
        solved = solved + noise.cpu().double().numpy()
    out = flat.copy()
    out[:, gone] = solved
    return torch.from_numpy(out).to(image).view(c, h, w)
