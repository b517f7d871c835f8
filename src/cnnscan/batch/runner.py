"""`run`: explain (and evaluate) every image of a folder, glob or table into an output
folder, in-process (default) or on Ray; resumable after any interruption."""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from cnnscan.batch.compute import Explainer, Resolution, Settings
from cnnscan.batch.inputs import Item, discover, resolve_labels
from cnnscan.batch.store import Part, Results, Store
from cnnscan.batch.summary import write_summary
from cnnscan.errors import BatchError
from cnnscan.models import Model, as_model
from cnnscan.targets import checked_top_k

PartPlan = list[tuple[int, list[Item]]]


def run(
    source: str | Path | Sequence[str | Path],
    methods: Sequence[str] | str = ("gradcam",),
    out: str | Path = "cnnscan-batch",
    *,
    model: Model | Any = None,
    targets: str | int | Sequence[int | str] = "top1",
    layer: str | Sequence[str] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    resolution: Resolution = "layer",
    dtype: Literal["float32", "float16"] = "float32",
    metrics: Sequence[str] | str = (),
    top_k: int | None = None,
    engine: Literal["local", "ray"] = "local",
    address: str | None = None,
    batch_size: int = 8,
    workers: int | None = None,
    part_size: int = 64,
    device: str | None = None,
    path_column: str = "path",
    label_column: str = "label",
    progress: bool = True,
    on_part: Callable[[Part], object] | None = None,
) -> Results:
    """Explain every image of `source` with `methods` and write the results to `out`.

    `source`: a folder (searched recursively), a glob, a CSV/Parquet table with a path column
    (and optionally label and x0, y0, x1, y1 box columns), or a list of paths. `targets`:
    "topK", "label" (the table's label) or class ids / names shared by all images.
    `resolution`: store maps at the method's own ("layer") or the input's resolution.
    `metrics`: evaluation metrics per row (e.g. "deletion", "insertion", "pointing_game").
    `top_k`: predictions kept per image (default 5; at most the model's classes).
    `workers` explainers run in parallel (default: one per thread torch would use), each
    computing on one thread: threads in-process, or with `engine="ray"` Ray Data actors
    running the same per-part function (a local Ray, or the cluster at `address`). The
    results are bitwise the same whatever the number of workers and the engine (see
    docs/batch.md, "Determinism"). Running again with the same `out` resumes:
    images already done are skipped. `on_part(part)` is called after each part is committed.
    Returns a `Results` reader of the output folder.
    """
    if engine not in ("local", "ray"):
        raise BatchError(f"engine must be 'local' or 'ray', got {engine!r}")
    workers = torch.get_num_threads() if workers is None else workers
    counts = {"batch_size": batch_size, "workers": workers, "part_size": part_size}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BatchError(f"{name} must be a positive whole number, got {value!r}")
    if not methods:
        raise BatchError("no methods given; e.g. methods=['gradcam'] (see cnnscan.list_methods())")
    found = discover(source, path_column=path_column, label_column=label_column)
    model = as_model(model)
    top_k = checked_top_k(top_k, model.num_classes)
    settings = Settings(
        methods=tuple([methods] if isinstance(methods, str) else methods),
        options={k: dict(v) for k, v in (options or {}).items()},
        layer=layer if layer is None or isinstance(layer, str) else tuple(layer),
        targets=targets if isinstance(targets, str) else _tuple(targets),
        top_k=top_k,
        resolution=resolution,
        dtype=dtype,
        metrics=tuple([metrics] if isinstance(metrics, str) else metrics),
        batch_size=batch_size,
        device=device,
    )
    explainer = Explainer(model, settings)  # checks methods, options, layers, targets
    items = resolve_labels(found, model.labels)
    explainer.rehearse(items)  # the settings on one image, before anything is written
    store = Store(out, explainer.metric_columns)
    try:
        done = store.open(_recorded(model, settings, explainer.metric_columns, source))
        parts = plan(items, done, part_size, store)
        todo = sum(len(part_items) for _, part_items in parts)
        began = time.perf_counter()
        with tqdm(
            total=len(items),
            initial=len(items) - todo,
            desc="batch",
            unit="img",
            file=sys.stderr,
            disable=not progress,
            smoothing=0.1,
        ) as bar:
            commit = _Committer(store, on_part)
            lock = threading.Lock()

            def advance(n: int) -> None:  # called from the explainer threads
                with lock:
                    bar.update(n)

            try:
                if engine == "ray":
                    from cnnscan.batch.ray_engine import run_ray

                    run_ray(model, settings, parts, commit.put, workers, address, advance)
                else:
                    with one_thread_each():
                        for part in explain_in_threads(explainer, parts, workers, advance):
                            commit.put(part)
            finally:
                commit.close()
        seconds = time.perf_counter() - began
        write_summary(store.out, seconds=seconds, images_this_run=todo)
    finally:
        store.close()
    return Results(out)


def explain_in_threads(
    explainer: Explainer,
    parts: PartPlan,
    workers: int,
    progress: Callable[[int], object] | None = None,
) -> Iterator[Part]:
    """The in-process engine: `workers` threads each explain whole parts (reading ahead on a
    helper thread), as Ray's actors do; parts are yielded as they finish. At most one part
    per worker is in progress, so memory does not grow with the number of parts."""
    remaining = iter(parts)
    with ThreadPoolExecutor(workers, thread_name_prefix="cnnscan-explain") as pool:
        running: set[Future] = set()

        def start() -> None:
            part = next(remaining, None)
            if part is not None:
                running.add(pool.submit(explainer.explain_part, *part, 1, progress))

        for _ in range(workers):
            start()
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                running.remove(future)
                yield future.result()
                start()


@contextmanager
def one_thread_each() -> Iterator[None]:
    """Torch computes on one thread in every worker for the block (the worker threads start
    inside it). How a kernel splits its work among threads changes the float rounding, so a
    fixed thread count per worker is what makes results independent of the number of
    workers; one is also the fastest share (docs/measurements.md)."""
    total = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(total)


def plan(items: list[Item], done: set[str], part_size: int, store: Store) -> PartPlan:
    """Parts still to do. Parts are cut from the whole input in order, so an unchanged input
    gives the same parts (and batches) in every run; a part that was committed is skipped,
    and images of a partly done part (the input changed) go into a part with a new number."""
    committed = store.committed
    chunks = [items[i : i + part_size] for i in range(0, len(items), part_size)]
    fresh = max(len(chunks), store.next_number)
    parts: PartPlan = []
    for number, chunk in enumerate(chunks):
        todo = [item for item in chunk if item.image_id not in done]
        if not todo:
            continue
        if len(todo) < len(chunk) or number in committed:
            number, fresh = fresh, fresh + 1
        parts.append((number, todo))
    return parts


def _tuple(targets: Any) -> tuple:
    return (targets,) if isinstance(targets, int) else tuple(targets)


def _recorded(
    model: Model, settings: Settings, metric_columns: list[str], source: Any
) -> dict[str, Any]:
    """The settings saved in run.json (those in store.RESULT_SETTINGS must match to resume)."""
    return {
        "model": model.name,
        "classes": model.num_classes,
        "methods": list(settings.methods),
        "options": settings.options,
        "layer": list(settings.layer) if isinstance(settings.layer, tuple) else settings.layer,
        "targets": settings.targets
        if isinstance(settings.targets, str)
        else list(settings.targets),
        "top_k": settings.top_k,
        "resolution": settings.resolution,
        "dtype": settings.dtype,
        "metrics": list(settings.metrics),
        "metric_columns": metric_columns,
        "source": [str(s) for s in source] if isinstance(source, list | tuple) else str(source),
    }


class _Committer:
    """Commits parts on a background thread (writing overlaps the next part's compute);
    at most two parts wait, so memory stays bounded. `close` waits and re-raises."""

    def __init__(self, store: Store, on_part: Callable[[Part], object] | None):
        self.store, self.on_part = store, on_part
        self.queue: queue.Queue[Part | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="cnnscan-commit", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while (part := self.queue.get()) is not None:
            if self.error is not None:
                continue
            try:
                self.store.commit(part)
                if self.on_part is not None:
                    self.on_part(part)
            except BaseException as e:
                self.error = e

    def put(self, part: Part) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(part)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
