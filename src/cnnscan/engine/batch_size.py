"""Batch sizes of the extra passes at other inputs: fixed by the work, within a memory budget.

The size of a batch can change the last bits of what is computed (a kernel splits its work
among threads by the size of the tensor), so it depends on nothing but the work and torch's
thread count: a size measured once as the fastest per item on the default model
(`preferred_batch`, docs/measurements.md), cut to what fits the memory budget. Sizes found
by timing each run (as an earlier version did) varied with the load, and the results too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

_DEFAULT_BUDGET_MB = 2048
PREFERRED = 4  # items per batch with several torch threads: flat from 2 to 8, worse at 16
PREFERRED_SINGLE = 1  # with one thread per op (scans): fastest and the least memory


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


def preferred_batch() -> int:
    """The batch size of extra passes at torch's current thread count (measured)."""
    return PREFERRED_SINGLE if torch.get_num_threads() == 1 else PREFERRED


def fixed_batches(total: int, limit: int, size: int | None = None) -> Iterator[slice]:
    """Slices covering range(total) in order, `size` items each (default
    `preferred_batch()`), at most `limit` (what fits the memory budget), at least one; the
    last may be shorter."""
    size = max(1, min(size or preferred_batch(), limit))
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))
