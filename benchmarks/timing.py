"""Shared timing for the benchmark scripts (run as `python benchmarks/bench_X.py`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def best_time(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """(the best wall-clock seconds of `repeat` calls, the last call's result)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        began = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - began)
    return best, result
