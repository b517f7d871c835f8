"""Metric columns of a batch run: the registered metrics that give one number per (image,
target), computed with `cnnscan.evaluate_many` on each batch's shared scan, each image with
its own box for the localization metrics. No metric is defined here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from cnnscan.attribution import Attribution
from cnnscan.batch.inputs import Item
from cnnscan.errors import BatchError, MetricError
from cnnscan.metrics import evaluate_many, get_metric, list_metrics, localization
from cnnscan.models import Model
from cnnscan.scan import Scan


def batch_metrics() -> list[str]:
    """The metrics a batch can store: one number per (image, target)."""
    return [info.name for info in list_metrics() if info.per_row]


class Evaluator:
    """The metrics of a run: their column names, each image's region (from its box), and
    the scores of a batch's attributions."""

    def __init__(self, model: Model, metrics: Sequence[str]):
        self.model = model
        chosen = []
        for name in metrics:
            try:
                info = get_metric(name)
            except MetricError as e:
                raise BatchError(f"{e}; batch metrics: {', '.join(batch_metrics())}") from None
            if not info.per_row:
                raise BatchError(
                    f"{info.name} does not give one number per image ({info.description}); "
                    f"run it with `cnnscan evaluate`. Batch metrics: {', '.join(batch_metrics())}"
                )
            chosen.append(info)
        self.metrics = list(dict.fromkeys(chosen))
        self.columns = [column.key for info in self.metrics for column in info.columns]
        self.needs_region = any(info.needs_region for info in self.metrics)

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
        names = [info.name for info in self.metrics]
        results = evaluate_many(self.model, None, attrs, names, scan=scan, regions=regions)
        return {
            name: {column: _grid(results[name].get(column), shape) for column in self.columns}
            for name in attrs
        }


def _grid(value: Any, shape: torch.Size) -> np.ndarray:
    """evaluate_many's value (a float for one image and target, else nested lists, None
    when the method reports nothing) as an (N, T) array."""
    if value is None:
        return np.full(tuple(shape), np.nan)
    return np.asarray(value, dtype=np.float64).reshape(tuple(shape))
