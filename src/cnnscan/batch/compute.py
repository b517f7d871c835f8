"""The per-part function both engines run: decode a part's images (prefetched on threads),
explain them in batches with one `Scan` per batch shared by every method, and return the
part's table rows and maps.

A batch records only the layers the methods use (resolved once, so no method asks the scan
for its layer table), and the model's working copy is made once per process. An image that
cannot be read, or whose batch fails and then fails again on its own, becomes an error row.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from cnnscan.attribution import Attribution
from cnnscan.batch.inputs import Item
from cnnscan.batch.store import Part
from cnnscan.errors import BatchError, CnnscanError, ImageError
from cnnscan.images import load_image
from cnnscan.layers import LayerRef, get_module
from cnnscan.methods import check_options, get_methods, rehearse, run_method
from cnnscan.models import Model
from cnnscan.scan import Scan, make_scan
from cnnscan.targets import class_ids, top_k

Resolution = Literal["layer", "input"]


class Loaded(NamedTuple):
    """What the reading threads prepare for one image."""

    input: torch.Tensor  # (1, 3, H, W) on the CPU
    region: torch.Tensor | None  # its box on the input (H, W), for the localization metrics


@dataclass(frozen=True)
class Settings:
    """What to compute for every image (the `run` options that change results)."""

    methods: tuple[str, ...] = ("gradcam",)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    layer: str | tuple[str, ...] | None = None
    targets: str | tuple[int | str, ...] = "top1"
    top_k: int = 5
    resolution: Resolution = "layer"
    dtype: Literal["float32", "float16"] = "float32"
    metrics: tuple[str, ...] = ()
    batch_size: int = 8
    device: str | None = None


class Explainer:
    """The model and settings of a run, ready to explain batches of images."""

    def __init__(self, model: Model, settings: Settings):
        self.model, self.settings = model, settings
        self.device = torch.device(settings.device) if settings.device else model.device
        self.infos = get_methods(settings.methods)
        unknown = set(settings.options) - {info.name for info in self.infos}
        if unknown:
            raise BatchError(f"options given for methods not requested: {sorted(unknown)}")
        for info in self.infos:
            check_options(info, settings.options.get(info.name, {}))
        layers = settings.layer if isinstance(settings.layer, tuple) else (settings.layer,)
        for layer in layers:
            if layer is not None:
                get_module(model.module, LayerRef.parse(layer).name)
        if settings.resolution not in ("layer", "input"):
            raise BatchError(f"resolution must be 'layer' or 'input', got {settings.resolution!r}")
        if settings.dtype not in ("float32", "float16"):
            raise BatchError(f"dtype must be 'float32' or 'float16', got {settings.dtype!r}")
        self.class_ids = _fixed_targets(settings.targets, model.labels)
        self.relu_rules = any(info.relu_rules for info in self.infos)
        # Layer maps (CAMs) need the layer's output and gradients through the part after it
        # only: their batches run without an autograd graph (ONNX Runtime where it can).
        self.graph = self.relu_rules or any(
            info.space != "layer" or info.needs_graph for info in self.infos
        )
        self._layer = settings.layer if not isinstance(settings.layer, tuple) else list(layers)
        self._evaluator = None
        if settings.metrics:
            from cnnscan.batch.evaluation import Evaluator

            self._evaluator = Evaluator(model, settings.metrics)
        self._succeeded = False

    @property
    def metric_columns(self) -> list[str]:
        return self._evaluator.columns if self._evaluator is not None else []

    # -- reading ------------------------------------------------------------------------
    def load(self, item: Item) -> Loaded:
        """The model input (1, 3, H, W) on the CPU for one image, and its box as a region of
        the input when a metric needs it; ImageError if the image is unusable."""
        if item.problem is not None:
            raise ImageError(item.problem)
        if item.label is None and self.settings.targets == "label":
            raise ImageError("no label for this image (targets='label' needs one per image)")
        picture = load_image(item.path)
        region = self._evaluator.region(item, picture) if self._evaluator is not None else None
        return Loaded(self.model.preprocessing(picture), region)

    # -- explaining ----------------------------------------------------------------------
    def rehearse(self, items: list[Item], tries: int = 8) -> None:
        """Try the settings on the first readable image (of the first `tries`) before the
        run writes anything: every method runs up to its first batched pass (see
        `cnnscan.methods.rehearse`), so a layer without spatial output, an option value it
        rejects or a working set over the memory budget fails now."""
        for item in items[:tries]:
            try:
                loaded = self.load(item)
            except Exception:  # an unreadable image is the run's business: an error row
                continue
            x = loaded.input.to(self.device)
            scan = Scan(
                self.model,
                x,
                layers=self._scan_layers(x),
                relu_rules=self.relu_rules,
                device=self.device,
            )
            targets = self._targets(scan, [item])
            for info in self.infos:
                layer = self._layer_for(info, x)
                rehearse(scan, info, targets, layer, self.settings.options.get(info.name))
            return

    def explain_part(
        self,
        number: int,
        items: list[Item],
        readers: int = 1,
        progress: Callable[[int], object] | None = None,
    ) -> Part:
        """Explain one part, its images read ahead on `readers` threads, in batches that
        never span two parts (so a part's results do not depend on its neighbours or on
        which engine ran it). `progress(n)` after every n images done."""
        part = Part(number, [item.image_id for item in items])
        ahead = max(2 * self.settings.batch_size, 4 * readers)
        batch: list[tuple[Item, Loaded]] = []
        for item, result in prefetch(iter(items), self.load, readers, ahead):
            if isinstance(result, BaseException):
                part.add_error(item.path, item.image_id, "read", _reason(result))
                if progress is not None:
                    progress(1)
                continue
            batch.append((item, result))
            if len(batch) == self.settings.batch_size:
                self._explain_batch(batch, part, progress)
                batch = []
        if batch:
            self._explain_batch(batch, part, progress)
        return part

    def _explain_batch(self, batch: list[tuple[Item, Loaded]], part: Part, progress=None) -> None:
        """Explain a batch; if it fails, each image alone, recording the ones that fail as
        errors. If every image of the run's first batch fails, the settings are at fault, not
        the data: the error is raised."""
        try:
            self._compute(batch, part)
            self._succeeded = True
        except (CnnscanError, RuntimeError, ValueError):
            for item, loaded in batch:
                try:
                    self._compute([(item, loaded)], part)
                    self._succeeded = True
                except (CnnscanError, RuntimeError, ValueError) as e:
                    part.add_error(item.path, item.image_id, "explain", _reason(e))
            if not self._succeeded:
                raise
        if progress is not None:
            progress(len(batch))

    def _compute(self, batch: list[tuple[Item, Loaded]], part: Part) -> None:
        items = [item for item, _ in batch]
        x = torch.cat([loaded.input for _, loaded in batch]).to(self.device)
        scan = Scan(
            self.model,
            x,
            layers=self._scan_layers(x),
            relu_rules=self.relu_rules,
            device=self.device,
            graph=self.graph,
        )
        targets = self._targets(scan, items)
        attrs = {
            info.name: run_method(
                scan,
                info,
                targets,
                self._layer_for(info, x),
                self.settings.options.get(info.name),
            )
            for info in self.infos
        }
        scores = {}
        if self._evaluator is not None:
            scores = self._evaluator.scores(scan, attrs, [loaded.region for _, loaded in batch])
        rows: dict[str, list] = {}
        maps: dict[str, list[np.ndarray]] = {}
        for info in self.infos:
            attr = attrs[info.name]
            self._add_rows(rows, maps, part, items, scan, attr, scores.get(info.name, {}))
        _extend(part.rows, rows)  # only now: a batch that fails leaves the part untouched
        _extend(part.arrays, maps)
        _extend(part.predictions, self._predictions(scan, items))

    # -- pieces ----------------------------------------------------------------------------
    def _scan_layers(self, x: torch.Tensor) -> list[str]:
        flat: list[str] = []
        for info in self.infos:
            layer = self._layer_for(info, x)
            if layer is not None:
                flat.extend(layer if isinstance(layer, list | tuple) else [layer])
        return sorted(set(flat))

    def _layer_for(self, info, x: torch.Tensor) -> str | list[str] | None:
        if "layer" not in info.options():
            return None
        if self._layer is None:  # the model's default layer, found once from one image
            self._layer = make_scan(self.model, x[:1], device=self.device).default_layer()
        return self._layer

    def _targets(self, scan: Scan, items: list[Item]) -> torch.Tensor:
        if self.settings.targets == "label":
            labels = [[item.label] for item in items]
            return scan.targets(torch.tensor(labels, dtype=torch.long))
        if self.class_ids is not None:
            return scan.targets(self.class_ids)
        return scan.targets(self.settings.targets)

    def _add_rows(
        self,
        rows: dict[str, list],
        maps_out: dict[str, list[np.ndarray]],
        part: Part,
        items: list[Item],
        scan: Scan,
        attr: Attribution,
        scores: dict[str, np.ndarray],
    ) -> None:
        maps = attr.upsample() if self.settings.resolution == "input" else attr.maps
        maps = maps.detach().to("cpu", getattr(torch, self.settings.dtype)).numpy()
        targets = attr.targets.cpu()
        probabilities = scan.probabilities.gather(1, attr.targets).cpu()
        logits = attr.scores.detach().cpu() if attr.scores is not None else None
        stored = maps_out.setdefault(attr.method, [])
        first = len(part.arrays.get(attr.method, []))
        labels = self.model.labels
        for i, item in enumerate(items):
            for t in range(targets.shape[1]):
                class_id = int(targets[i, t])
                row = {
                    "path": item.path,
                    "image_id": item.image_id,
                    "method": attr.method,
                    "layer": _layer_text(attr.layer),
                    "target_rank": t,
                    "target": class_id,
                    "target_name": labels[class_id] if class_id < len(labels) else None,
                    "label": item.label,
                    "probability": float(probabilities[i, t]),
                    "score": float(logits[i, t]) if logits is not None else None,
                    "array_file": f"arrays/{part.name}.npz",
                    "array_key": attr.method,
                    "array_index": first + len(stored),
                }
                for column, values in scores.items():
                    row[column] = _finite(values[i, t])
                stored.append(maps[i, t])
                for key, value in row.items():
                    rows.setdefault(key, []).append(value)

    def _predictions(self, scan: Scan, items: list[Item]) -> dict[str, list]:
        probabilities, ids = scan.top(self.settings.top_k)
        logits = scan.logits.detach().gather(1, ids).cpu()
        probabilities, ids = probabilities.cpu(), ids.cpu()
        columns: dict[str, list] = {}
        for i, item in enumerate(items):
            for rank in range(ids.shape[1]):
                class_id = int(ids[i, rank])
                values = {
                    "path": item.path,
                    "image_id": item.image_id,
                    "rank": rank + 1,
                    "class_id": class_id,
                    "class_name": self.model.labels[class_id],
                    "probability": float(probabilities[i, rank]),
                    "logit": float(logits[i, rank]),
                    "label": item.label,
                }
                for key, value in values.items():
                    columns.setdefault(key, []).append(value)
        return columns


def prefetch(
    items: Iterator[Item], load, workers: int, ahead: int
) -> Iterator[tuple[Item, Loaded | BaseException]]:
    """(item, loaded value or the exception it raised), in order, with up to `ahead` items
    being read on `workers` threads while the caller computes (PIL decodes without the GIL)."""
    with ThreadPoolExecutor(workers, thread_name_prefix="cnnscan-read") as pool:
        pending: deque[tuple[Item, Future]] = deque()

        def submit() -> None:
            item = next(items, None)
            if item is not None:
                pending.append((item, pool.submit(_attempt, load, item)))

        for _ in range(ahead):
            submit()
        try:
            while pending:
                item, future = pending.popleft()
                submit()
                yield item, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def _attempt(load, item: Item) -> Loaded | BaseException:
    try:
        return load(item)
    except Exception as e:  # any unreadable file is one error row, never the end of the run
        return e


def _fixed_targets(targets: Any, labels: tuple[str, ...]) -> torch.Tensor | None:
    """Class ids shared by every image, or None for 'topK' / 'label' (decided per image)."""
    if targets == "label" or top_k(targets) is not None:
        return None
    return class_ids(targets, labels)


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, CnnscanError):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _layer_text(layer: Any) -> str | None:
    if layer is None:
        return None
    return ",".join(map(str, layer)) if isinstance(layer, list | tuple) else str(layer)


def _finite(value: Any) -> float | None:
    number = float(value)
    return number if np.isfinite(number) else None


def _extend(columns: dict[str, list], more: dict[str, list]) -> None:
    for key, values in more.items():
        columns.setdefault(key, []).extend(values)
