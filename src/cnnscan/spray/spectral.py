"""Spectral clustering as SpRAy does it (Lapuschkin et al. 2019, Nature Communications 10:1096),
on CoRelAy's graph: each map is joined to its `n_neighbors` nearest others (Euclidean), with
weight 1, symmetrized as (A + Aᵀ)/2 (CoRelAy's `SparseKNN`); the graph's symmetric normalized
Laplacian L = I − D^-½ A D^-½ has eigenvalues 0 = λ1 ≤ λ2 ≤ …; the number of clusters k is the
place of the largest gap λ_{k+1} − λ_k (k ≤ max_clusters), and k-means (seeded) on the rows of
the first k eigenvectors, each scaled to unit length (Ng, Jordan and Weiss 2001), gives the
clusters.

The neighbours are found in chunks of rows by one matrix product each, so memory stays
O(N · (dimensions + chunk)) instead of CoRelAy's N × N distance matrix; the eigenvectors come
from a sparse Lanczos solver (dense for small N).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh
from scipy.sparse import csr_matrix, diags
from scipy.sparse.linalg import eigsh

from cnnscan.errors import AuditError

CHUNK = 1024  # rows of the distance matrix at a time
DENSE_BELOW = 1500  # points: below, a dense eigensolver is faster and as exact


@dataclass
class Spectrum:
    """Cluster per point (N,), the Laplacian's smallest eigenvalues and the number of
    clusters (the eigengap's k, unless k-means left a cluster empty)."""

    labels: np.ndarray
    eigenvalues: np.ndarray
    k: int


def nearest(x: np.ndarray, n_neighbors: int) -> np.ndarray:
    """Indices (N, n) of each row's n nearest other rows (Euclidean), nearest first."""
    data = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    squares = (data * data).sum(dim=1)
    out = []
    for start in range(0, len(data), CHUNK):
        block = data[start : start + CHUNK]
        dist = squares[start : start + CHUNK, None] + squares[None, :] - 2 * block @ data.T
        rows = torch.arange(len(block))
        dist[rows, rows + start] = float("inf")  # not its own neighbour
        out.append(dist.topk(n_neighbors, dim=1, largest=False).indices)
    return torch.cat(out).numpy()


def knn_affinity(x: np.ndarray, n_neighbors: int = 10) -> csr_matrix:
    """CoRelAy's `SparseKNN(n_neighbors, symmetric=True)` of the points `x` (N, D)."""
    n = len(x)
    k = min(n_neighbors, n - 1)
    columns = nearest(x, k)
    rows = np.repeat(np.arange(n), k)
    graph = csr_matrix((np.ones(n * k), (rows, columns.ravel())), shape=(n, n))
    return (graph + graph.T) / 2.0


def laplacian_spectrum(affinity: csr_matrix, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The `count` smallest eigenvalues (ascending) of the symmetric normalized Laplacian and
    their eigenvectors (N, count)."""
    n = affinity.shape[0]
    scale = diags(np.asarray(affinity.sum(axis=1)).ravel() ** -0.5)
    normalized = scale @ affinity @ scale
    count = min(count, n)
    if n < DENSE_BELOW or count >= n - 1:
        values, vectors = eigh(normalized.toarray(), subset_by_index=(n - count, n - 1))
    else:
        start = np.full(n, 1.0 / np.sqrt(n))  # a fixed start vector: the same result every run
        values, vectors = eigsh(normalized, k=count, which="LA", v0=start)
    order = np.argsort(-values)
    return np.clip(1.0 - values[order], 0.0, 2.0), vectors[:, order]


def eigengap(eigenvalues: np.ndarray, max_clusters: int) -> int:
    """The k ≤ max_clusters after which the ascending eigenvalues jump most."""
    top = min(max_clusters, len(eigenvalues) - 1)
    if top < 1:
        return 1
    gaps = np.diff(eigenvalues[: top + 1])
    return int(np.argmax(gaps)) + 1


def spectral_clusters(
    x: np.ndarray,
    n_neighbors: int = 10,
    max_clusters: int = 10,
    n_eigval: int = 32,
    seed: int = 0,
) -> Spectrum:
    """SpRAy's clusters of the points `x` (N, D) (see module doc); one cluster below 3 points."""
    KMeans = sklearn_part("cluster", "KMeans")
    n = len(x)
    if n < 3:
        return Spectrum(np.zeros(n, dtype=int), np.zeros(min(n, 1)), 1)
    values, vectors = laplacian_spectrum(knn_affinity(x, n_neighbors), max(n_eigval, 2))
    k = eigengap(values, max_clusters)
    if k == 1:
        return Spectrum(np.zeros(n, dtype=int), values, 1)
    rows = vectors[:, :k]
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-300)
    labels = _by_size(KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(rows))
    return Spectrum(labels, values, int(labels.max()) + 1)  # k-means may leave one empty


def sklearn_part(module: str, name: str):
    """`sklearn.<module>.<name>`, or an AuditError saying how to install scikit-learn."""
    import importlib

    try:
        return getattr(importlib.import_module(f"sklearn.{module}"), name)
    except ImportError:
        raise AuditError(
            "the audit needs scikit-learn (k-means, t-SNE): pip install 'cnnscan[audit]'"
        ) from None


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Cluster numbers renamed 0, 1, … from the largest cluster down (ties: first seen)."""
    ids, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = ids[np.lexsort((first, -counts))]
    rename = np.empty(ids.max() + 1, dtype=int)
    rename[order] = np.arange(len(order))
    return rename[labels]
