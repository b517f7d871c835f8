"""What the web app computes, without Streamlit: one session's workspace (its shared
forward and explanation cells) and the result cache all sessions share. Every number comes
from the library; this module only routes.

Thread safety: one `Model` is shared by every session. The library never changes it: each
forward runs on a private working copy (`cnnscan.engine.working_copy.runnable`) whose hooks act only
in the thread that set them. A `Workspace` (and its `Scan`) belongs to one session; its
lock serializes the session's own script run and its deferred downloads.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import torch
from PIL import Image

import cnnscan
from cnnscan.app.sources import SourceImage
from cnnscan.attribution import Attribution
from cnnscan.errors import MethodError
from cnnscan.layers import LayerRow
from cnnscan.methods import MethodInfo, get_method, list_methods, run_method
from cnnscan.models import Model
from cnnscan.scan import make_scan


# -- the shared result cache ----------------------------------------------------------------------
def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.nelement() * value.element_size()
    if isinstance(value, Attribution):
        return _nbytes(value.maps) + sum(_nbytes(v) for v in value.extras.values())
    if isinstance(value, dict | list | tuple):
        items = value.values() if isinstance(value, dict) else value
        return sum(_nbytes(v) for v in items)
    return getattr(value, "nbytes", 0) or 0


class ResultCache:
    """Results by key, shared by every session (a key fixes the model, picture, method,
    layer, options and target, so it always gives the same result); the least recently
    used go first when they take more than `max_bytes`."""

    def __init__(self, max_bytes: int = 512 * 2**20):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._total = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = _nbytes(value)
        with self._lock:
            if key in self._items:
                self._total -= self._items.pop(key)[1]
            self._items[key] = (value, size)
            self._total += size
            while self._total > self.max_bytes and len(self._items) > 1:
                _, (_, dropped) = self._items.popitem(last=False)
                self._total -= dropped

    def __len__(self) -> int:
        return len(self._items)


RESULTS = ResultCache()


# -- explanation columns and cells -----------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """One column of the comparison grid: a method at a layer (None: its default) with options."""

    method: str
    layer: str | None = None
    options: str = "{}"  # JSON, keys sorted

    @property
    def title(self) -> str:
        return self.method if self.layer is None else f"{self.method} @ {self.layer}"

    @property
    def file_stem(self) -> str:
        stem = self.method if self.layer is None else f"{self.method}@{self.layer}"
        if self.options != "{}":
            stem += "-" + hashlib.sha1(self.options.encode()).hexdigest()[:6]
        return stem.replace("/", "_")

    def option_values(self) -> dict[str, Any]:
        return json.loads(self.options)


def parse_options(info: MethodInfo, text: str) -> str:
    """A method's options typed in the page (a JSON object) -> canonical JSON, or a
    MethodError naming the options the method takes."""
    text = text.strip() or "{}"
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise MethodError(f"{info.name}: options must be a JSON object ({e.msg})") from e
    if not isinstance(values, dict):
        raise MethodError(f'{info.name}: options must be a JSON object, e.g. {{"n_steps": 32}}')
    if "layer" in values:
        raise MethodError(f"{info.name}: pick layers with the Layers control, not in options")
    allowed = info.options()
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        listing = ", ".join(k for k in allowed if k != "layer") or "none"
        raise MethodError(f"{info.name} has no option {', '.join(unknown)}; its options: {listing}")
    return json.dumps(values, sort_keys=True)


def columns_for(
    methods: Sequence[str], layers: Sequence[str], options: dict[str, str]
) -> list[Column]:
    """Grid columns: each method once, or once per chosen layer if it takes a layer."""
    columns = []
    for name in methods:
        info = get_method(name)
        takes_layer = "layer" in info.options()
        for layer in (layers or [None]) if takes_layer else [None]:
            columns.append(Column(info.name, layer, options.get(info.name, "{}")))
    return columns


def first_screen_methods() -> list[str]:
    """What the first screen shows: Grad-CAM, or the first gradient method if it is missing."""
    names = [m.name for m in list_methods()]
    for preferred in ("gradcam", "integrated_gradients", "gradient"):
        if preferred in names:
            return [preferred]
    return names[:1]


def split_targets(attr: Attribution, requested: int) -> list[Attribution]:
    """One single-target Attribution per requested target (method extras of shape (N, T, …)
    are split with the maps). A result that explains something other than the classes (a
    layer unit) holds for every target."""
    n, t = attr.maps.shape[:2]
    if t != requested:
        return [attr] * requested

    def part(value: Any, k: int) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim >= 2 and tuple(value.shape[:2]) == (n, t):
            return value[:, k : k + 1].clone()
        return value

    return [
        replace(
            attr,
            maps=part(attr.maps, k),
            targets=part(attr.targets, k),
            scores=part(attr.scores, k) if attr.scores is not None else None,
            extras={key: part(value, k) for key, value in attr.extras.items()},
        )
        for k in range(t)
    ]


def join_targets(cells: Sequence[Attribution]) -> Attribution:
    """The inverse of `split_targets`: one Attribution with the cells' targets in order."""
    first = cells[0]
    if all(cell is first for cell in cells):
        return first
    n = first.maps.shape[0]

    def joined(values: list[Any]) -> Any:
        head = values[0]
        if isinstance(head, torch.Tensor) and head.ndim >= 2 and tuple(head.shape[:2]) == (n, 1):
            return torch.cat(values, dim=1)
        return head

    return replace(
        first,
        maps=joined([c.maps for c in cells]),
        targets=joined([c.targets for c in cells]),
        scores=joined([c.scores for c in cells]) if first.scores is not None else None,
        extras={key: joined([c.extras.get(key) for c in cells]) for key in first.extras},
    )


Progress = Callable[[int, int, str], object]


class Workspace:
    """One session's model and picture: the shared forward (a `Scan`), predictions, layers
    and explanation cells. Not shared between sessions."""

    def __init__(
        self,
        model: Model,
        model_key: str,
        picture: SourceImage,
        results: ResultCache | None = None,
    ):
        self.model = model
        self.model_key = model_key
        self.picture = picture
        self.results = RESULTS if results is None else results
        self.lock = threading.RLock()

    @property
    def key(self) -> tuple[str, str]:
        return self.model_key, self.picture.digest

    @cached_property
    def scan(self) -> cnnscan.Scan:
        """One forward with switchable ReLUs, recording every layer: every method shares it."""
        with self.lock:
            return make_scan(self.model, self.picture.image, list_methods())

    @cached_property
    def view(self) -> Image.Image:
        """The picture as the model sees it (resized, cropped): the overlays' background."""
        return self.model.view(self.picture.image)

    def predictions(self, k: int = 5) -> list[dict[str, Any]]:
        with self.lock:
            return self.scan.predictions(k)[0]

    def prediction_rows(self, class_ids: Sequence[int]) -> list[dict[str, Any]]:
        """Rank, label, probability and logit of any classes (rank in the model's ranking)."""
        with self.lock:
            ranking = self.scan.predictions(self.scan.logits.shape[1])[0]
        by_id = {row["class_id"]: row for row in ranking}
        return [by_id[int(c)] for c in class_ids]

    def top_classes(self, k: int) -> list[int]:
        with self.lock:
            return self.scan.targets(f"top{k}")[0].tolist()

    def layer_rows(self) -> list[LayerRow]:
        with self.lock:
            return self.scan.layer_table()

    def spatial_layers(self) -> list[str]:
        """Layers with an (C, H, W) output larger than 1×1: where maps can be read."""
        return [
            row.name
            for row in self.layer_rows()
            if not row.passthrough
            and row.output_shape is not None
            and len(row.output_shape) == 3
            and row.output_shape[1] * row.output_shape[2] > 1
        ]

    def default_layer(self) -> str:
        with self.lock:
            return self.scan.default_layer()

    def cell_key(self, column: Column, target: int) -> tuple:
        return ("cell", *self.key, column.method, column.layer, column.options, int(target))

    def explain(
        self, column: Column, targets: Sequence[int], progress: Progress | None = None
    ) -> list[Attribution]:
        """The column's cell for each target: cached ones at once, the missing ones from one
        call of the method (which shares its work across them)."""
        cells = {t: self.results.get(self.cell_key(column, t)) for t in targets}
        missing = [t for t in dict.fromkeys(targets) if cells[t] is None]
        if missing:
            if progress is not None:
                progress(0, len(missing), column.title)
            began = time.perf_counter()
            with self.lock:
                attr = run_method(
                    self.scan,
                    get_method(column.method),
                    torch.tensor([missing], device=self.scan.device),
                    column.layer,
                    column.option_values(),
                )
            seconds = time.perf_counter() - began
            self.results.put(self._seconds_key(column), self.seconds(column) + seconds)
            for t, cell in zip(missing, split_targets(attr, len(missing)), strict=True):
                self.results.put(self.cell_key(column, t), cell)
                cells[t] = cell
        return [cells[t] for t in targets]

    def _seconds_key(self, column: Column) -> tuple:
        return ("seconds", *self.key, column.method, column.layer, column.options)

    def seconds(self, column: Column) -> float:
        """Seconds the column's cells took to compute for this picture (all its targets)."""
        return self.results.get(self._seconds_key(column)) or 0.0

    def feature_maps(self, layer: str) -> torch.Tensor:
        """The activations (C, H, W) of `layer` for this picture, from the shared forward."""
        with self.lock:
            maps = self.scan.activations(layer).detach()[0]
        if maps.ndim != 3:
            raise MethodError(
                f"layer {layer} outputs shape {tuple(maps.shape)}, not feature maps (C, H, W); "
                "pick a convolutional layer"
            )
        return maps

    def cached(self, key: tuple, compute: Callable[[], Any], per_picture: bool = True) -> Any:
        """A result shared through the cache under this workspace's model (and picture)."""
        full = (*key, *(self.key if per_picture else self.key[:1]))
        value = self.results.get(full)
        if value is None:
            with self.lock:
                value = compute()
            self.results.put(full, value)
        return value

    def concepts(self, layer: str, target: int, top: int, pictures: bool) -> cnnscan.Concepts:
        """The `top` concepts of `layer` for class `target` (`cnnscan.concepts`, LRP), from
        the shared forward; with `pictures`, their synthesized pictures (cached on disk)."""
        return self.cached(
            ("concepts", layer, int(target), int(top), bool(pictures)),
            lambda: cnnscan.concepts(
                self.model,
                None,
                [int(target)],
                layer=layer,
                top=top,
                pictures=pictures,
                scan=self.scan,
            ),
        )

    def receptive_fields(self) -> dict[str, cnnscan.ReceptiveField]:
        return self.cached(
            ("receptive", tuple(self.scan.inputs.shape[-2:])),
            lambda: cnnscan.receptive_fields(self.model, self.scan.inputs[:1]),
            per_picture=False,
        )


def evaluation_available() -> bool:
    """True once the library has `cnnscan.evaluate` (the evaluation view appears then)."""
    return callable(getattr(cnnscan, "evaluate", None))
