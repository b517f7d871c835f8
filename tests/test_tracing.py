"""Thread safety of the shared working copy: a forward in one thread must not see another
thread's fx trace (which patches nn.Module.__call__ for every thread) or its hooks.

Each test makes the two threads meet deterministically: the traced or hooked forward in
thread A stops half-way (inside `Rendezvous`), thread B runs a real forward of the same
module, then A finishes. Without the fixes, B got an fx `Proxy` back from the trace, and
the hooked head's replacement activations from A's hook.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from cnnscan.engine.folding import fold_layers
from cnnscan.engine.head import _hooked_head, head_of
from cnnscan.engine.tracing import Tracer, symbolic_trace
from cnnscan.layers import LayerRef


class Rendezvous(nn.Module):
    """Identity; in the armed thread it lets `other` run in the middle of the forward."""

    def __init__(self):
        super().__init__()
        self.owner: int | None = None
        self.other = None
        self.join = True  # False: call `other` here instead of running it in a thread

    def forward(self, x):
        if self.owner == threading.get_ident() and self.other is not None:
            other, self.other = self.other, None
            if not self.join:
                other()
                return x
            worker = threading.Thread(target=other)
            worker.start()
            worker.join(timeout=60)
            assert not worker.is_alive()
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.meet = Rendezvous()
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        x = self.meet(F.relu(self.bn(self.conv1(x))))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture
def net():
    return Net().eval()


def _meet_during(net: Net, x: torch.Tensor, work):
    """Run `work()` here; half-way through its forward, a forward of `net` on `x` runs in
    another thread. Returns (work's result, the other thread's output)."""
    seen = {}

    def other():
        with torch.no_grad():
            seen["out"] = net(x)

    net.meet.owner, net.meet.other = threading.get_ident(), other
    try:
        result = work()
    finally:
        net.meet.owner = net.meet.other = None
    assert "out" in seen, "the other thread did not run inside the forward"
    return result, seen["out"]


@pytest.mark.parametrize("trace", ["tracer", "fold", "split"])
def test_forward_in_another_thread_during_a_trace_gets_real_tensors(net, trace):
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = net(x)
    alone = Tracer().trace(net)

    def work():
        if trace == "tracer":
            return symbolic_trace(net)
        if trace == "fold":
            return fold_layers(net)
        return head_of(net, LayerRef("conv2"), x)

    result, other = _meet_during(net, x, work)
    assert type(other) is torch.Tensor  # not an fx Proxy
    torch.testing.assert_close(other, expected, rtol=0, atol=0)
    if trace == "tracer":  # B's calls left no nodes in A's graph
        assert [n.format_node() for n in result.graph.nodes] == [
            n.format_node() for n in alone.nodes
        ]
        torch.testing.assert_close(result(x), expected, rtol=0, atol=0)
    elif trace == "fold":
        assert isinstance(result, fx.GraphModule)  # the BatchNorm was folded
        calls = [n.target for n in result.graph.nodes if n.op == "call_module"]
        assert calls == ["conv1", "conv2", "fc"]
        with torch.no_grad():
            torch.testing.assert_close(result(x), expected, rtol=1e-5, atol=1e-5)
    else:
        assert result.traced
        with torch.no_grad():
            acts = F.relu(net.conv2(F.relu(net.bn(net.conv1(x)))))
            torch.testing.assert_close(result(acts, torch.arange(2)), expected)


def test_a_second_trace_waits_for_the_first(net):
    """Two traces at once would stack their patches of nn.Module.__call__: the first's
    calls would bypass its tracer, and the later revert would leave a patch in place. Here
    the second trace (of another net) pauses half-way until the first has finished; with
    the lock it only starts after the first."""
    original, original_getattr = nn.Module.__call__, nn.Module.__getattr__
    other_net = Net().eval()
    alone = [n.format_node() for n in Tracer().trace(net).nodes]
    graphs, second_paused, first_done = {}, threading.Event(), threading.Event()

    def pause_second():
        second_paused.set()
        first_done.wait(timeout=60)

    def second():
        other_net.meet.owner = threading.get_ident()
        other_net.meet.other, other_net.meet.join = pause_second, False
        graphs["second"] = Tracer().trace(other_net)

    worker = threading.Thread(target=second)

    def start_second():  # half-way through the first trace
        worker.start()
        second_paused.wait(timeout=0.5)  # an unguarded second trace is now mid-way

    net.meet.owner = threading.get_ident()
    net.meet.other, net.meet.join = start_second, False
    try:
        graphs["first"] = Tracer().trace(net)
    finally:
        first_done.set()
        net.meet.owner = net.meet.other = None
    worker.join(timeout=60)
    assert nn.Module.__call__ is original
    assert nn.Module.__getattr__ is original_getattr
    for graph in graphs.values():
        assert [n.format_node() for n in graph.nodes] == alone


def test_hooked_head_replaces_only_its_own_threads_layer_output(net):
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = net(x)
        replacement = torch.randn(2, 6, 8, 8)
        head = _hooked_head(net, LayerRef("conv2"), x)
        result, other = _meet_during(net, x, lambda: head(replacement, torch.arange(2)))
        torch.testing.assert_close(other, expected, rtol=0, atol=0)
        torch.testing.assert_close(result, net.fc(F.relu(replacement).mean(dim=(2, 3))))


def test_every_fx_trace_in_cnnscan_uses_the_thread_safe_tracer():
    """A plain fx trace anywhere in the package would bring the cross-thread Proxy back."""
    import re
    from pathlib import Path

    import cnnscan

    plain = re.compile(
        r"\bfx\.(Tracer|symbolic_trace)\b|torch\.fx\.symbolic_trace\b"
        r"|from torch\.fx import [^\n]*\b(Tracer|symbolic_trace)\b"
    )
    root = Path(cnnscan.__file__).parent
    offenders = [
        f"{path.relative_to(root)}:{text[: match.start()].count(chr(10)) + 1}"
        for path in sorted(root.rglob("*.py"))
        if path.name != "tracing.py"
        for text in [path.read_text("utf-8")]
        for match in plain.finditer(text)
    ]
    assert not offenders, (
        f"plain torch.fx tracing in {offenders}: subclass cnnscan.engine.tracing.Tracer or call "
        "cnnscan.engine.tracing.symbolic_trace, so that other threads' forwards are not traced"
    )
