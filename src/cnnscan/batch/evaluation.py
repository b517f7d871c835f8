"""Metric columns of a batch run, computed with cnnscan's evaluation API on each batch's
shared scan: `cnnscan.evaluate_many` for the metrics that perturb the input (deletion,
insertion, average drop, max-sensitivity, completeness), and the localization metrics with
each image's own box. No metric is defined here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from cnnscan.attribution import Attribution
from cnnscan.batch.inputs import Item
from cnnscan.errors import BatchError, MetricError
from cnnscan.metrics import METRICS, evaluate_many, localization
from cnnscan.metrics.relevance import relevance
from cnnscan.models import Model
from cnnscan.scan import Scan

ALIASES = {
    "deletion": "deletion_auc",
    "insertion": "insertion_auc",
    "pointing": "pointing_game",
    "energy": "energy_in_box",
}
_COLUMNS = {"average_drop": ("average_drop", "increase_in_confidence")}
_REGION = ("pointing_game", "energy_in_box")
# These give a list per block or a verdict, not one number per row: run `cnnscan evaluate`.
_NOT_PER_ROW = ("model_randomization", "target_randomization")
BATCH_METRICS = tuple(m for m in METRICS if m not in _NOT_PER_ROW)


class Evaluator:
    """The metrics of a run: their column names, each image's region (from its box), and
    the scores of a batch's attributions."""

    def __init__(self, model: Model, metrics: Sequence[str]):
        self.model = model
        chosen = []
        for name in metrics:
            key = ALIASES.get(name.strip().lower(), name.strip().lower())
            if key not in BATCH_METRICS:
                raise BatchError(
                    f"unknown metric {name!r}; batch metrics: {', '.join(BATCH_METRICS)} "
                    f"(aliases: {', '.join(ALIASES)}); the sanity checks "
                    f"({', '.join(_NOT_PER_ROW)}) are for `cnnscan evaluate`"
                )
            chosen.append(key)
        self.metrics = list(dict.fromkeys(chosen))
        self.columns = [c for m in self.metrics for c in _COLUMNS.get(m, (m,))]
        self.needs_region = any(m in _REGION for m in self.metrics)

    def region(self, item: Item, picture: Image.Image) -> torch.Tensor | None:
        """The item's box on the model input (H, W), or None without a box or when the box
        lies outside what the model sees (its region metrics are then null)."""
        if not self.needs_region or item.box is None:
            return None
        try:
            return localization.region(
                self.model.preprocessing.size,
                box=item.box,
                picture=picture,
                preprocessing=self.model.preprocessing,
            )
        except MetricError:
            return None

    def scores(
        self,
        scan: Scan,
        attrs: dict[str, Attribution],
        regions: list[torch.Tensor | None],
    ) -> dict[str, dict[str, np.ndarray]]:
        """{method: {column: (N, T) float array}}, NaN where a metric does not apply."""
        shape = next(iter(attrs.values())).targets.shape
        out: dict[str, dict[str, np.ndarray]] = {name: {} for name in attrs}
        perturbing = [m for m in self.metrics if m not in _REGION]
        if perturbing:
            results = evaluate_many(self.model, None, attrs, perturbing, scan=scan)
            for name in attrs:
                for metric in perturbing:
                    for column in _COLUMNS.get(metric, (metric,)):
                        out[name][column] = _grid(results[name][column], shape)
        located = [i for i, r in enumerate(regions) if r is not None]
        for metric in (m for m in self.metrics if m in _REGION):
            for name, attr in attrs.items():
                values = np.full(shape, np.nan)
                if located:
                    rel = relevance(attr)[located]  # (M, T, H, W)
                    area = torch.stack([regions[i] for i in located]).to(rel.device)
                    area = area.unsqueeze(1).expand_as(rel)
                    score = (
                        localization.pointing_game(rel.flatten(0, 1), area.flatten(0, 1))
                        if metric == "pointing_game"
                        else localization.energy_in_box(rel.flatten(0, 1), area.flatten(0, 1))
                    )
                    values[located] = score.view(len(located), -1).cpu().numpy()
                out[name][metric] = values
        return out


def _grid(value: Any, shape: torch.Size) -> np.ndarray:
    """evaluate_many's value (a float for one image and target, else nested lists, None
    when the method reports nothing) as an (N, T) array."""
    if value is None:
        return np.full(tuple(shape), np.nan)
    return np.asarray(value, dtype=np.float64).reshape(tuple(shape))
