"""SpRAy's clustering step: cnnscan's audit vs CoRelAy 1.0's pipeline on the same maps.

    python benchmarks/bench_audit.py               # 10,000 maps of 32 × 32
    python benchmarks/bench_audit.py --maps 2000 --repeat 3

The maps are precomputed and random but not structureless: each is one of 8 blobs (a
Gaussian at a random place of the 32 × 32 grid) with its centre jittered, plus uniform
noise, scaled to unit L1 norm as the audit scales them. Both sides get the same maps and the
same settings (10 neighbours, symmetric binary k-NN affinity, symmetric normalized
Laplacian, 32 eigenpairs, k-means with 10 starts on the unit rows of the first k
eigenvectors, k as cnnscan's eigengap chose).
CoRelAy's pipeline computes the full distance matrix (scipy `pdist`, then `squareform`) and
argsorts every row; cnnscan finds the neighbours in chunks by matrix products. Prints the
seconds (best of `--repeat`), the ratio, the adjusted Rand index between the two clusterings
and the t-SNE picture's cost on top (at most 2,000 maps). Timing on a shared machine is
noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.metrics import adjusted_rand_score
from timing import best_time

from cnnscan.spray.run import embedding
from cnnscan.spray.spectral import spectral_clusters


def blob_maps(
    n: int, size: int = 32, groups: int = 8, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(n, size²) unit-L1 maps and their blob group."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(4, size - 4, (groups, 2))
    group = rng.integers(groups, size=n)
    where = centres[group] + rng.normal(0, 1.5, (n, 2))
    yy, xx = np.mgrid[:size, :size]
    d2 = (yy[None] - where[:, 0, None, None]) ** 2 + (xx[None] - where[:, 1, None, None]) ** 2
    maps = np.exp(-d2 / 8) + rng.uniform(0, 0.05, (n, size, size))
    maps = maps.reshape(n, -1).astype(np.float32)
    return maps / maps.sum(axis=1, keepdims=True), group


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--maps", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    from corelay.pipeline.spectral import SpectralClustering
    from corelay.processor.clustering import KMeans
    from corelay.processor.embedding import EigenDecomposition

    maps, group = blob_maps(args.maps)
    ours_s, found = best_time(lambda: spectral_clusters(maps), args.repeat)

    def first_k(eigen):  # the k eigenvectors of the smallest Laplacian eigenvalues, rows unit
        vectors = eigen[1][:, -found.k :]  # eigsh lists them last
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    pipeline = SpectralClustering(
        embedding=EigenDecomposition(n_eigval=32, which="LA", normalize=False),
        select_eigenvector=first_k,
        clustering=KMeans(n_clusters=found.k, kwargs={"n_init": 10, "random_state": 0}),
    )
    theirs_s, labels = best_time(lambda: pipeline(maps), args.repeat)
    tsne_s, _ = best_time(lambda: embedding(maps, 0), args.repeat)
    print(f"{args.maps} maps of {maps.shape[1]} values, k = {found.k} (eigengap)")
    print(f"cnnscan spectral clustering  {ours_s:8.2f} s")
    ratio = theirs_s / ours_s
    print(f"CoRelAy SpectralClustering   {theirs_s:8.2f} s  -> cnnscan {ratio:.1f}x faster")
    print(
        f"ARI cnnscan vs CoRelAy {adjusted_rand_score(labels, found.labels):.3f}, "
        f"cnnscan vs the blob groups {adjusted_rand_score(group, found.labels):.3f}"
    )
    print(
        f"t-SNE picture (at most 2,000 maps) {tsne_s:8.2f} s; audit step total "
        f"{ours_s + tsne_s:.2f} s"
    )


if __name__ == "__main__":
    main()
