"""Give freed memory back to the operating system between the stages of a long job. glibc
keeps the memory of freed tensors in its heap (and raises its mmap threshold after large
frees), so a process's resident size only grows from stage to stage; handing it back keeps
the peak near what the job really holds. (Mapping every large tensor instead cost a scan a
third more time in page faults: docs/measurements.md.) Elsewhere than glibc: nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import cache


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def trim() -> None:
    """Collect garbage and return the heap's free memory to the system."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
