"""torch.fx tracing that other threads do not notice.

While `fx.Tracer.trace` runs, it replaces `nn.Module.__call__` and `nn.Module.__getattr__`
on the class itself, so a forward running at the same time in another thread (another web
session on the shared model) is routed into the tracer and gets a `Proxy` back instead of
a tensor. `Tracer` hands such calls straight to the real module, and one lock keeps two
traces from stacking their patches (a later revert would restore the other's patch).
"""

from __future__ import annotations

import threading
from typing import Any

from torch import fx, nn

_trace_lock = threading.RLock()


class Tracer(fx.Tracer):
    """An `fx.Tracer` whose global patches act only in the thread that traces."""

    _owner: int | None = None

    def trace(self, root: nn.Module | Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        with _trace_lock:
            self._owner = threading.get_ident()
            try:
                return super().trace(root, concrete_args)
            finally:
                self._owner = None

    def _foreign(self) -> bool:
        return threading.get_ident() != self._owner

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self._foreign():  # another thread's real forward: run it as usual
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._foreign():
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def symbolic_trace(root: nn.Module) -> fx.GraphModule:
    """`torch.fx.symbolic_trace` through `Tracer`."""
    tracer = Tracer()
    graph = tracer.trace(root)
    name = root.__class__.__name__ if isinstance(root, nn.Module) else root.__name__
    return fx.GraphModule(tracer.root, graph, name)
