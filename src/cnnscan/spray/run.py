"""`cnnscan.audit`: Spectral Relevance Analysis (SpRAy, Lapuschkin et al. 2019) of a batch
output. Per class, the maps are clustered (`cnnscan.spray.spectral`), each cluster described
(size, mean map, accuracy and mean confidence of its images) and checked for a shortcut
(`cnnscan.spray.flags`), and the maps are embedded in 2-D with t-SNE for the picture.

The per-image work is the batch engine's (in-process or on Ray, resumable); the audit reads
only the stored maps, shrunk to size × size: memory N · size² · 4 bytes for the largest class
(plus the k-NN graph, N · n_neighbors entries). The neighbour search costs N² · size²
multiply-adds per class (10,000 maps at 32 × 32: ~1e11, seconds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnscan.batch.store import Results
from cnnscan.errors import AuditError
from cnnscan.spray.flags import inspect
from cnnscan.spray.maps import ClassMaps, class_maps
from cnnscan.spray.spectral import sklearn_part, spectral_clusters

EMBED_MAX = 2000  # maps per class in the t-SNE picture (a seeded sample above)


@dataclass
class Audit:
    """The audit's tables as pyarrow Tables (`.to_pandas()` for DataFrames): `classes` (one
    row per class), `clusters` (one per cluster) and `members` (one per map: its cluster and
    2-D position), the mean map (size, size) of every (class, cluster) and the run's output."""

    classes: Any
    clusters: Any
    members: Any
    mean_maps: dict[tuple[int, int], np.ndarray] = field(repr=False)
    results: Results = field(repr=False)
    method: str = "lrp"

    def write(self, out: str | Path, model: Any = None, examples: int = 6) -> Path:
        """Write audit.html and the three tables as Parquet to `out`; returns the page."""
        from cnnscan.spray.page import write_page

        return write_page(self, Path(out), model=model, examples=examples)


def audit(
    source: str | Path | Sequence[str | Path],
    *,
    method: str = "lrp",
    classes: Sequence[int | str] | None = None,
    out: str | Path | None = None,
    model: Any = None,
    size: int = 32,
    reduce: str = "abs",
    n_neighbors: int = 10,
    max_clusters: int = 10,
    seed: int = 0,
    **batch_options: Any,
) -> Audit:
    """Audit the maps of `method` in a batch output folder, or explain `source` (a folder,
    glob, table or list of images, as `cnnscan.batch.run` takes) into `out`/batch first
    (resumed if it exists). `classes`: ids or names (default: every class explained).
    With `out`, also writes `out`/audit.html and the tables."""
    if not isinstance(max_clusters, int) or isinstance(max_clusters, bool) or max_clusters < 1:
        raise AuditError(f"max_clusters must be an integer >= 1, got {max_clusters!r}")
    if not isinstance(n_neighbors, int) or isinstance(n_neighbors, bool) or n_neighbors < 1:
        raise AuditError(f"n_neighbors must be an integer >= 1, got {n_neighbors!r}")
    results = _results(source, method, out, model, batch_options)
    groups = class_maps(results, method, classes, size, reduce)
    if not groups:
        raise AuditError(f"{results.out} holds no {method} maps yet (no committed part)")
    tables: dict[str, list[dict]] = {"classes": [], "clusters": [], "members": []}
    mean_maps = {}
    for group in groups:
        spectrum = spectral_clusters(group.maps, n_neighbors, max_clusters, seed=seed)
        tables["classes"].append(
            {
                "class_id": group.class_id,
                "class_name": group.class_name,
                "maps": len(group.rows),
                "clusters": spectrum.k,
                "eigenvalues": spectrum.eigenvalues[: max_clusters + 1].tolist(),
            }
        )
        position = embedding(group.maps, seed)
        for cluster in range(spectrum.k):
            chosen = np.flatnonzero(spectrum.labels == cluster)
            mean = group.maps[chosen].mean(axis=0).reshape(size, size)
            mean_maps[(group.class_id, cluster)] = mean
            tables["clusters"].append(_cluster_row(group, cluster, chosen, mean))
        for i, row in enumerate(group.rows):
            tables["members"].append(_member_row(group, row, int(spectrum.labels[i]), position[i]))
    import pyarrow as pa

    found = Audit(
        *(pa.Table.from_pylist(tables[name]) for name in ("classes", "clusters", "members")),
        mean_maps=mean_maps,
        results=results,
        method=method,
    )
    if out is not None:
        found.write(out, model=model)
    return found


def _results(source, method, out, model, batch_options) -> Results:
    """The batch output `source` is, or the one made by explaining it into out/batch."""
    if isinstance(source, str | Path) and (Path(source) / "run.json").exists():
        if batch_options:
            raise AuditError(
                f"{source} is a finished batch output: batch options "
                f"({', '.join(batch_options)}) apply only when explaining images"
            )
        return Results(source)
    from cnnscan.batch import run

    if out is None:
        raise AuditError("auditing images (not a batch output) needs out= for the batch run")
    return run(source, [method], Path(out) / "batch", model=model, **batch_options)


def _cluster_row(group: ClassMaps, cluster: int, chosen: np.ndarray, mean: np.ndarray) -> dict:
    members = [group.rows[i] for i in chosen]
    labelled = [r for r in members if r["label"] is not None]
    finding = inspect(mean, len(chosen))
    x0, y0, x1, y1 = finding.region
    return {
        "class_id": group.class_id,
        "class_name": group.class_name,
        "cluster": cluster,
        "size": len(chosen),
        "share": len(chosen) / len(group.rows),
        "accuracy": (
            sum(r["predicted"] == r["label"] for r in labelled) / len(labelled)
            if labelled
            else None
        ),
        "labelled": len(labelled),
        "mean_confidence": float(np.mean([r["probability"] for r in members])),
        "border_share": finding.border_share,
        "spot_area": finding.spot_area,
        "region_x0": x0,
        "region_y0": y0,
        "region_x1": x1,
        "region_y1": y1,
        "suspicious": finding.suspicious,
        "reason": finding.reason,
    }


def _member_row(group: ClassMaps, row: dict, cluster: int, position: np.ndarray) -> dict:
    x, y = (float(v) if np.isfinite(v) else None for v in position)
    return {
        "class_id": group.class_id,
        "cluster": cluster,
        "image_id": row["image_id"],
        "path": row["path"],
        "label": row["label"],
        "predicted": row["predicted"],
        "probability": row["probability"],
        "x": x,
        "y": y,
        "array_file": row["array_file"],
        "array_key": row["array_key"],
        "array_index": row["array_index"],
    }


def embedding(maps: np.ndarray, seed: int) -> np.ndarray:
    """t-SNE positions (N, 2) of at most EMBED_MAX maps (a seeded sample; NaN for the rest)."""
    TSNE = sklearn_part("manifold", "TSNE")
    n = len(maps)
    position = np.full((n, 2), np.nan)
    if n < 4:
        position[:, :] = np.column_stack([np.arange(n), np.zeros(n)])
        return position
    chosen = np.random.default_rng(seed).permutation(n)[:EMBED_MAX]
    chosen.sort()
    tsne = TSNE(
        n_components=2, perplexity=min(30.0, (len(chosen) - 1) / 3), init="pca", random_state=seed
    )
    position[chosen] = tsne.fit_transform(maps[chosen])
    return position
