"""Single-threaded torch with work in lanes: how a scan uses two cores.

Torch's intra-op threads meet at a barrier after every operation; at the small batches an
explanation runs, on a machine shared with another job, one descheduled thread stalls the
others (a scan took 15-20x longer under another two-thread job, docs/measurements.md). One
thread per operation never waits, gives the same bits whatever the load, and the second
core runs an independent task in a lane beside it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def single_threaded() -> Iterator[ThreadPoolExecutor]:
    """Within the block torch runs each operation on one thread (restored after, also on
    errors); yields a lane: an executor whose one worker runs tasks beside the caller."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="cnnscan-lane") as lane:
            yield lane
    finally:
        torch.set_num_threads(previous)


@contextmanager
def beside(lane: Executor | None, fn: Callable[..., object], *args: Any) -> Iterator[None]:
    """Run `fn(*args)` in `lane` while the block runs (before it, when there is no lane);
    on leaving, wait for it and raise its error (an error of the block's own wins)."""
    if lane is None:
        fn(*args)
        yield
        return
    future = lane.submit(fn, *args)
    try:
        yield
    finally:
        wait([future])
    future.result()


class SharedWork:
    """Items that both lanes take, one at a time and in order, calling `fn(item)`: the
    first free lane takes the next, so the lanes finish together whichever items are slow.
    After an error no lane starts another item."""

    def __init__(self, items: Iterable[Any], fn: Callable[[Any], object]):
        self._items, self._fn = deque(items), fn
        self._lock, self._failed = threading.Lock(), False

    def drain(self) -> None:
        """Take and do items until none is left (or one failed, here or in the other lane)."""
        while True:
            with self._lock:
                if self._failed or not self._items:
                    return
                item = self._items.popleft()
            try:
                self._fn(item)
            except BaseException:
                self._failed = True
                raise
