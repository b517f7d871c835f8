"""The maps an audit clusters: per class, every stored map of one method from a batch output,
its channels reduced as the metrics read them, resized to size × size (area averaging when
shrinking) and scaled to unit L1 norm, so that clusters form by where the relevance lies,
not by how much there is. Only the small maps are kept: N · size² float32 values (100,000
maps at 32 × 32 take 410 MB).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cnnscan.batch.store import Results
from cnnscan.errors import AuditError
from cnnscan.metrics.relevance import reduce_channels


@dataclass
class ClassMaps:
    """The rows of one class (dicts of the rows table, plus `predicted`, the image's top-1
    class) and their maps (N, size²), row for row."""

    class_id: int
    class_name: str | None
    rows: list[dict]
    maps: np.ndarray


def small_maps(maps: torch.Tensor, size: int, reduce: str = "abs") -> torch.Tensor:
    """(N, C, h, w) maps -> (N, size²) float32: channels reduced, resized, unit L1 norm
    (all-zero maps stay zero)."""
    reduced = reduce_channels(maps.float(), reduce)
    shrink = reduced.shape[-2] >= size and reduced.shape[-1] >= size
    resized = F.interpolate(
        reduced, size=(size, size), mode="area" if shrink else "bilinear", align_corners=None
    ).flatten(1)
    total = resized.abs().sum(dim=1, keepdim=True)
    return torch.where(total > 0, resized / total.clamp_min(1e-30), resized)


def class_maps(
    results: Results,
    method: str,
    classes: Sequence[int | str] | None = None,
    size: int = 32,
    reduce: str = "abs",
) -> list[ClassMaps]:
    """Per explained class (the rows of each image's first target, most maps first), its
    small maps."""
    if method not in results.settings["methods"]:
        raise AuditError(
            f"the batch output has no {method!r} maps; its methods: "
            f"{', '.join(results.settings['methods'])} (pass --method)"
        )
    if isinstance(size, bool) or not isinstance(size, int) or not 4 <= size <= 256:
        raise AuditError(f"size must be an integer from 4 to 256, got {size!r}")
    rows = [
        r for r in results.rows().to_pylist() if r["method"] == method and r["target_rank"] == 0
    ]
    top1 = {
        p["image_id"]: p["class_id"] for p in results.predictions().to_pylist() if p["rank"] == 1
    }
    by_class: dict[int, list[dict]] = {}
    for row in rows:
        by_class.setdefault(row["target"], []).append(
            {**row, "predicted": top1.get(row["image_id"])}
        )
    chosen = sorted(by_class, key=lambda c: (-len(by_class[c]), c))
    if classes is not None:
        chosen = [_class_id(c, by_class) for c in classes]
    out = []
    for class_id in chosen:
        members = sorted(
            by_class[class_id], key=lambda r: (r["array_file"], r["array_key"], r["array_index"])
        )
        stacked = []
        for start in range(0, len(members), 256):  # bounded memory: full maps 256 at a time
            chunk = [torch.from_numpy(results.array(r)) for r in members[start : start + 256]]
            stacked.append(small_maps(torch.stack(chunk), size, reduce).numpy())
        name = members[0]["target_name"]
        out.append(ClassMaps(class_id, name, members, np.concatenate(stacked)))
    return out


def _class_id(wanted: int | str, by_class: dict[int, list[dict]]) -> int:
    """A class of the output by id or name (case-insensitive), or an AuditError listing them."""
    for class_id, members in by_class.items():
        name = members[0]["target_name"] or ""
        if str(wanted).strip().lower() in (str(class_id), name.lower()):
            return class_id
    present = ", ".join(
        f"{c} ({m[0]['target_name']})" if m[0]["target_name"] else str(c)
        for c, m in sorted(by_class.items())
    )
    raise AuditError(f"no maps of class {wanted!r} in the batch output; classes: {present}")
