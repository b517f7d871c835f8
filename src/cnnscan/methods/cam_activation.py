"""CAM family, activation-only CAMs: maps read from a layer's activations A (N, K, h, w) alone,
without gradients of the target.

Eigen-CAM, KPCA-CAM and FEM are class-agnostic (the same map for every target); deep feature
factorization finds a few concepts in A and shows, for each target, the concept the part of
the network after the layer scores highest for that class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cnnscan.errors import MethodError
from cnnscan.methods.cam import (
    cam_result,
    first_component,
    layer_name,
    spatial_activations,
    weighted_sum,
)
from cnnscan.methods.options import count, number
from cnnscan.methods.registry import MethodResult, register

if TYPE_CHECKING:
    from cnnscan.scan import Scan


def _every_target(raw: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A class-agnostic map (N, h, w) repeated for each target: (N, T, h, w)."""
    return raw.unsqueeze(1).expand(-1, targets.shape[1], -1, -1)


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
    layer = layer_name(scan, layer)
    acts = spatial_activations(scan, layer)
    return cam_result(_every_target(first_component(acts), targets), layer)


# -- KPCA-CAM: the first kernel principal component ------------------------------------------
_KERNELS = ("sigmoid", "rbf", "poly", "linear", "cosine")
_MAX_POSITIONS = 4096  # the kernel matrix is (h·w)², float64


def _kernel(x: torch.Tensor, kernel: str, gamma: float) -> torch.Tensor:
    """scikit-learn's pairwise kernels of the rows of x (P, K), with coef0 = 1, degree = 3."""
    if kernel == "linear":
        return x @ x.T
    if kernel == "cosine":
        unit = x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        return unit @ unit.T
    if kernel == "rbf":
        squares = (x * x).sum(dim=1)
        distances = (squares[:, None] + squares[None, :] - 2 * x @ x.T).clamp_min(0)
        return torch.exp(-gamma * distances)
    dot = gamma * (x @ x.T) + 1.0
    return torch.tanh(dot) if kernel == "sigmoid" else dot**3


def _kernel_component(acts: torch.Tensor, kernel: str, gamma: float | None) -> torch.Tensor:
    """First kernel principal component of the centred positions of acts (K, h, w): (h, w),
    scaled by √λ as scikit-learn's KernelPCA.fit_transform, largest magnitude positive."""
    k, h, w = acts.shape
    x = acts.reshape(k, h * w).T.double()
    if bool((x == x[:1]).all()):  # every position alike: nothing to project (not 1e-16 noise)
        return acts.new_zeros((h, w))
    x = x - x.mean(dim=0)
    gram = _kernel(x, kernel, 1.0 / k if gamma is None else gamma)
    gram = gram - gram.mean(dim=0) - gram.mean(dim=1, keepdim=True) + gram.mean()
    values, vectors = torch.linalg.eigh(gram)
    projection = vectors[:, -1] * values[-1].clamp_min(0).sqrt()
    if projection.amin().abs() > projection.amax().abs():
        projection = -projection
    return projection.to(acts.dtype).view(h, w)


@register(
    "kpcacam",
    family="cam",
    space="layer",
    signed=False,
    description="KPCA-CAM: projection of the activations on their first kernel principal "
    "component (class-agnostic; sigmoid kernel by default).",
    cost="one (h·w)² eigendecomposition per image",
    paper="Karmani et al. 2024, arXiv:2410.00267",
    in_default_scan=False,
)
def kpcacam(
    scan: Scan,
    targets: torch.Tensor,
    *,
    layer: str | None = None,
    kernel: str = "sigmoid",
    gamma: float | None = None,
) -> MethodResult:
    """Kernels as scikit-learn's (`gamma=None`: 1 / channels); the linear kernel gives
    Eigen-CAM. The positions are centred first, as pytorch-grad-cam does."""
    if kernel not in _KERNELS:
        raise MethodError(f"kernel must be one of {_KERNELS}, got {kernel!r}")
    if gamma is not None:
        gamma = number("gamma", gamma, positive=True)
    layer = layer_name(scan, layer)
    acts = spatial_activations(scan, layer)
    positions = acts.shape[-2] * acts.shape[-1]
    if positions > _MAX_POSITIONS:
        raise MethodError(
            f"kpcacam needs a layer with at most {_MAX_POSITIONS} positions (its kernel matrix "
            f"is positions²); {layer!r} has {positions}: pick a deeper layer"
        )
    raw = torch.stack([_kernel_component(a, kernel, gamma) for a in acts])
    return cam_result(_every_target(raw, targets), layer)


# -- FEM: channels weighted by how much of them stands out ---------------------------------------
@register(
    "fem",
    family="cam",
    space="layer",
    signed=False,
    description="FEM: each channel weighted by the share of its positions above its mean + "
    "k·std (class-agnostic).",
    cost="free (no backward)",
    paper="Fuad et al. 2020, IPTA (hal-02963298)",
    in_default_scan=False,
)
def fem(
    scan: Scan, targets: torch.Tensor, *, layer: str | None = None, n_std: float = 2.0
) -> MethodResult:
    """The k-sigma rule with the population standard deviation of each channel."""
    n_std = number("n_std", n_std)
    layer = layer_name(scan, layer)
    acts = spatial_activations(scan, layer)
    mean = acts.mean(dim=(-2, -1), keepdim=True)
    std = acts.std(dim=(-2, -1), keepdim=True, correction=0)
    weights = (acts > mean + n_std * std).to(acts.dtype).mean(dim=(-2, -1))  # (N, K)
    return cam_result(_every_target(weighted_sum(weights.unsqueeze(1), acts)[:, 0], targets), layer)


# -- Deep feature factorization: concepts by NMF of the activations -------------------------
def _cd_update(x: np.ndarray, w: np.ndarray, ht: np.ndarray) -> float:
    """One cyclic coordinate-descent pass over the columns of w (in place) for
    min ‖x − w htᵀ‖², w ≥ 0 (scikit-learn's `_update_cdnmf_fast`, rows updated together):
    returns the projected-gradient violation before the pass. In numpy: the matrices are
    small and a pass is a few dozen tiny operations, where torch's per-call cost dominates."""
    hht = ht.T @ ht
    xht = x @ ht
    violation = 0.0
    for t in range(w.shape[1]):
        grad = w @ hht[:, t] - xht[:, t]
        column = w[:, t]
        violation += float(np.abs(np.where(column == 0, np.minimum(grad, 0), grad)).sum())
        if hht[t, t] != 0:
            w[:, t] = np.maximum(column - grad / hht[t, t], 0)
    return violation


def _nmf(
    x: np.ndarray, n_components: int, seed: int, tol: float = 1e-4, max_iter: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """x (S, F) ≥ 0 ≈ w (S, n) · h (n, F): scikit-learn's NMF(init="random", solver="cd")
    with the same initial factors (|N(0, 1)| · √(mean x / n) from numpy's RandomState(seed),
    h drawn first) and stopping rule, in float64."""
    rng = np.random.RandomState(seed)
    scale = np.sqrt(x.mean() / n_components)
    h = np.abs(rng.standard_normal((n_components, x.shape[1]))) * scale
    w = np.abs(rng.standard_normal((x.shape[0], n_components))) * scale
    ht = np.ascontiguousarray(h.T)
    first = None
    for _ in range(max_iter):
        violation = _cd_update(x, w, ht) + _cd_update(x.T, ht, w)
        first = violation if first is None else first
        if first == 0 or violation / first <= tol:
            break
    return w, ht.T


@register(
    "dff",
    family="cam",
    space="layer",
    signed=False,
    description="Deep feature factorization: NMF of the activations into concepts; each "
    "target shows the concept the rest of the network scores most probable for it.",
    cost="one NMF + 1 head-only forward per concept",
    paper="Collins et al. 2018, arXiv:1806.10206",
    in_default_scan=False,
)
def dff(
    scan: Scan,
    targets: torch.Tensor,
    *,
    layer: str | None = None,
    n_components: int = 5,
    seed: int = 0,
) -> MethodResult:
    """Each image is factorized alone: A − min_channel (K, h·w) ≈ W H (pytorch-grad-cam's
    `dff`), concept embeddings W + min, concept maps H. A concept is scored by running the
    part after the layer on a feature map that is its embedding at every position (for a
    GAP + linear head, the classifier applied to the embedding, as pytorch-grad-cam labels
    concepts); a target's map is the concept map with the highest softmax probability for
    its class. Everything is in `extras["concepts"]`: maps (N, n, h, w), embeddings
    (N, n, K), probabilities (N, n, classes); `extras["concept"]` (N, T) is the one shown."""
    n_components = count("n_components", n_components)
    seed = count("seed", seed, minimum=0)
    layer = layer_name(scan, layer)
    acts = spatial_activations(scan, layer)
    n, k, h, w = acts.shape
    maps, embeddings = [], []
    for image in acts:
        x = image.reshape(k, h * w).double().cpu().numpy()
        offset = x.min(axis=1, keepdims=True)
        concepts, factors = _nmf(x - offset, n_components, seed)
        embeddings.append(torch.from_numpy((concepts + offset).T).to(acts))
        maps.append(torch.from_numpy(factors.reshape(n_components, h, w)).to(acts))
    embeddings_t, maps_t = torch.stack(embeddings), torch.stack(maps)
    rows = torch.arange(n, device=acts.device).repeat_interleave(n_components)
    everywhere = embeddings_t.reshape(-1, k, 1, 1).expand(-1, k, h, w)
    with scan.head(layer) as head, torch.no_grad():
        logits = head(everywhere.contiguous(), rows)
    probabilities = logits.softmax(dim=1).view(n, n_components, -1)
    chosen = probabilities.gather(2, targets.unsqueeze(1).expand(-1, n_components, -1))
    concept = chosen.argmax(dim=1)  # (N, T)
    raw = maps_t.gather(1, concept[..., None, None].expand(-1, -1, h, w))
    extras: dict[str, Any] = {
        "concept": concept,
        "concepts": {"maps": maps_t, "embeddings": embeddings_t, "probabilities": probabilities},
    }
    return cam_result(raw, layer, extras)
