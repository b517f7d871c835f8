"""The Ray engine: the same per-part function (`Explainer.explain_part`) mapped over the
parts with Ray Data on a pool of actors, each holding the model once. The driver commits
the parts as they arrive, so the output folder is the same as the in-process engine's.

Locally it starts an embedded Ray (one CPU per actor, no dashboard, a temporary folder, a
small object store) and stops it afterwards; with `address` it joins an existing cluster,
whose workers must be able to import cnnscan and read the image paths.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from cnnscan.batch.compute import Explainer, Settings
from cnnscan.batch.inputs import Item
from cnnscan.batch.store import Part
from cnnscan.errors import BatchError, CnnscanError
from cnnscan.models import Model

OBJECT_STORE_BYTES = 512 * 2**20  # an embedded Ray's object store: parts are small


class _Worker:
    """A Ray actor: builds the explainer once, then explains one part per call; cnnscan's
    own errors (bad settings) come back as data, so the driver reports them in one line."""

    def __init__(self, model: Model, settings: Settings):
        torch.set_num_threads(1)  # as the in-process workers: the same bits (runner.py)
        self.explainer = Explainer(model, settings)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for number, listing in zip(batch["number"], batch["items"], strict=True):
            items = [Item.from_dict(entry) for entry in json.loads(str(listing))]
            try:
                result: Part | CnnscanError = self.explainer.explain_part(int(number), items, 1)
            except CnnscanError as e:  # the driver raises it as it is, not wrapped by Ray
                result = e
            results.append(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
        return {"number": batch["number"], "result": np.array(results, dtype=object)}


def run_ray(
    model: Model,
    settings: Settings,
    parts: list[tuple[int, list[Item]]],
    commit: Callable[[Part], object],
    workers: int,
    address: str | None,
    progress: Callable[[int], object],
) -> None:
    """Explain `parts` on `workers` Ray actors, calling `commit` for each finished part."""
    if not parts:
        return
    ray = _import_ray()
    with _ray_session(ray, address, workers), _quiet("ray.data"):
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours counts images
        context.print_on_execution_start = False
        listing = [
            {"number": number, "items": json.dumps([item.to_dict() for item in items])}
            for number, items in parts
        ]
        dataset = ray.data.from_items(listing, override_num_blocks=len(listing))
        explained = dataset.map_batches(
            _Worker,
            fn_constructor_kwargs={"model": model, "settings": settings},
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,
        )
        sizes = {number: len(items) for number, items in parts}
        for row in explained.iter_rows():
            result = pickle.loads(row["result"])  # made by our own workers just now
            if isinstance(result, CnnscanError):
                raise result
            commit(result)
            progress(sizes[result.number])


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise BatchError(
            "the Ray engine needs Ray Data: pip install 'cnnscan[ray]' (or 'ray[data]')"
        ) from e
    return ray


@contextmanager
def _quiet(logger_name: str):
    """Ray Data's progress chatter off (warnings about real problems still show)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _ray_session(ray: Any, address: str | None, workers: int):
    """Use the running Ray, join `address`, or start (and later stop) a local one."""
    if ray.is_initialized():
        yield
        return
    temp = None
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray writes a token in $HOME
    try:
        if address is not None:
            ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        else:
            temp = tempfile.mkdtemp(prefix="cnnscan-ray-")
            ray.init(
                num_cpus=workers,
                include_dashboard=False,
                object_store_memory=OBJECT_STORE_BYTES,
                _temp_dir=temp,
                log_to_driver=False,
                logging_level="WARNING",
            )
    finally:
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
    try:
        yield
    finally:
        ray.shutdown()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
