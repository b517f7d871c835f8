"""Batch sizes chosen by measurement, within a memory budget.

On a CPU a bigger batch is not always faster per image (docs/measurements.md), so
`adaptive_batches` times the real work: it hands out chunks of 1, 2, 4, ... items until the
time per item is more than 5 % worse than the best seen (a plateau, as between batch 1 and 2
on the default model, does not stop the search), then settles on the best size and
remembers it for the same kind of work. Nothing is computed twice to measure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Hashable, Iterator

_DEFAULT_BUDGET_MB = 2048
_learned: dict[Hashable, int] = {}


_UNITS = {"": 2**20, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30}


def parse_memory(value: int | float | str) -> int:
    """Bytes from a number of MiB (2048) or a size with a unit ("512MB", "4 GB", "1.5g")."""
    text = str(value).strip().lower().replace("ib", "b")
    number = text.rstrip("kmgb ").strip()
    unit = text[len(number) :].strip()
    try:
        size = float(number) * _UNITS[unit]
    except (KeyError, ValueError):
        size = float("nan")
    if not size > 0 or size == float("inf"):
        raise ValueError(
            f"max_memory must be a positive size like 2048 (MiB), '512MB' or '4GB'; got {value!r}"
        )
    return int(size)


def memory_budget_bytes(max_memory: int | float | str | None = None) -> int:
    """Peak working memory a batch may take: `max_memory` if given, else the environment's
    `CNNSCAN_MEMORY_MB`, else 2048 MiB."""
    if max_memory is not None:
        return parse_memory(max_memory)
    try:
        return parse_memory(os.environ.get("CNNSCAN_MEMORY_MB", _DEFAULT_BUDGET_MB))
    except ValueError as e:
        raise ValueError(f"the environment variable CNNSCAN_MEMORY_MB: {e}") from None


def max_batch_for(bytes_per_item: int, ceiling: int = 64, budget: int | None = None) -> int:
    """The largest batch whose working memory fits `budget` bytes (default: the environment's
    budget, `memory_budget_bytes()`), at least 1."""
    if bytes_per_item <= 0:
        return ceiling
    budget = memory_budget_bytes() if budget is None else budget
    return max(1, min(ceiling, budget // bytes_per_item))


def adaptive_batches(
    total: int, key: Hashable, limit: int, fixed: int | None = None
) -> Iterator[slice]:
    """Slices covering range(total); the caller does each chunk's work before asking again.

    `fixed` forces a batch size; otherwise the size learned for `key` is used, or learned now.
    """
    size = fixed or _learned.get(key)
    if size is not None:
        size = max(1, min(size, limit))
        for start in range(0, total, size):
            yield slice(start, min(start + size, total))
        return
    start, size, best_size, best_time = 0, 1, 1, float("inf")
    exploring = True
    while start < total:
        n = min(size, total - start)
        began = time.perf_counter()
        yield slice(start, start + n)
        per_item = (time.perf_counter() - began) / n
        start += n
        if not exploring or n < size:  # a short last chunk says little about `size`
            continue
        if per_item < best_time:
            best_size, best_time = size, per_item
        if per_item < best_time * 1.05 and size * 2 <= limit:  # not worse yet: try bigger
            size *= 2
            continue
        exploring = False
        size = best_size
        _learned[key] = best_size
    if exploring and size > 4:  # the work ran out after 1, 2, 4, ...: keep the best seen
        _learned[key] = best_size
