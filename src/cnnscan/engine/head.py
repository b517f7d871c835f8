"""Split a model at a layer so that only the part after it re-runs on new activations.

Methods that perturb a layer's output (Ablation-CAM) need the logits for many edited
copies of one activation. Re-running the whole network for each, as the peer libraries
do, repeats the unchanged trunk. `head_of` traces the model with torch.fx, keeping the
layer as one node, and builds the sub-graph of everything that depends on that node; values
the head needs from before the layer (a skip connection that jumps over it, the input) are
computed once by the trunk and passed in. Models that do not trace fall back to full
forwards with the layer's output replaced by a hook: slower, same numbers.
"""

from __future__ import annotations

import contextvars
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn

from cnnscan.engine.logits import logits_of
from cnnscan.engine.tracing import Tracer
from cnnscan.errors import LayerError
from cnnscan.layers import LayerRef, get_module


@dataclass
class Head:
    """logits = head(activations, rows): `activations` (B, *layer shape) replace the layer's
    output for images `inputs[rows]` (rows: LongTensor (B,) into the scan's batch)."""

    run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    traced: bool  # True: only the part after the layer runs; False: full forwards

    def __call__(self, activations: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return logits_of(self.run(activations, rows))


# The hooked head's replacement applies only to forwards run by the thread that set it.
_replacing: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "cnnscan_head_replacing", default=None
)
_traces: weakref.WeakKeyDictionary[nn.Module, dict[LayerRef, _Split]] = weakref.WeakKeyDictionary()


def head_of(runner: nn.Module, ref: LayerRef, inputs: torch.Tensor) -> Head:
    """The part of `runner` after layer `ref`, for the images `inputs` (N, 3, H, W)."""
    get_module(runner, ref.name)  # a clear error for unknown names
    try:
        split = _split(runner, ref)
        saved: tuple = ()
        if split.trunk is not None:
            with torch.no_grad():
                saved = tuple(split.trunk(inputs))
        per_image, constant = saved[: split.per_image], saved[split.per_image :]
        if not all(isinstance(v, torch.Tensor) and len(v) == len(inputs) for v in per_image):
            raise ValueError("a value the head needs is not batched like the input")
    except (fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError, ValueError):
        return Head(_hooked_head(runner, ref, inputs), traced=False)

    def run(activations: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        per_row = (v[rows] for v in per_image)
        return split.head(activations, _input_rows(inputs, rows), *per_row, *constant)

    return Head(run, traced=True)


def _input_rows(inputs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """inputs[rows]; a broadcast view instead of a copy when every row is the same image (the
    usual batch of edited copies of one image: the head reads the input for its sizes, if at
    all, and copying the image per row cost more than the head itself on the default model).
    Values saved from before the layer stay copies: the head may write into those."""
    if len(rows) > 1 and bool((rows == rows[0]).all()):
        return inputs[rows[:1]].expand(len(rows), *inputs.shape[1:])
    return inputs[rows]


def _split(runner: nn.Module, ref: LayerRef) -> _Split:
    cache = _traces.setdefault(runner, {})
    if ref not in cache:
        cache[ref] = _build_split(runner, ref)
    return cache[ref]


class _KeepLayer(Tracer):
    """Trace into every module except the one to split at, which stays a single node."""

    def __init__(self, layer: str):
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name == self.layer or super().is_leaf_module(module, qualified_name)


_SHAPE_METHODS = {"size", "dim"}
_SHAPE_FUNCTIONS = {
    getattr,
    len,
    operator.getitem,
    operator.add,
    operator.sub,
    operator.mul,
    operator.floordiv,
    operator.truediv,
}


def _is_shape_op(node: fx.Node) -> bool:
    """Reads or combines sizes only (`x.size(0)`, `x.shape[1] * 2`): cheap to recompute."""
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    return node.op == "call_function" and node.target in _SHAPE_FUNCTIONS


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    frontier = [node]
    while frontier:
        for arg in frontier.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                frontier.append(arg)
    return seen


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    frontier = [node]
    while frontier:
        for user in frontier.pop().users:
            if user not in seen:
                seen.add(user)
                frontier.append(user)
    return seen


@dataclass
class _Split:
    """head(activation, inputs, *per_image values, *constant values) -> output; the trunk
    returns (*per_image, *constant) for a batch of inputs."""

    head: fx.GraphModule
    trunk: fx.GraphModule | None
    per_image: int


def _find_call(graph: fx.Graph, ref: LayerRef) -> fx.Node:
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == ref.name]
    if not calls:
        raise ValueError(f"{ref} is not a module call in the traced graph")
    if ref.call is None and len(calls) > 1:
        raise LayerError(f"layer {ref.name!r} runs {len(calls)} times per forward; name one call")
    index = ref.call or 0
    if index >= len(calls):
        raise LayerError(f"layer {ref.name!r} runs {len(calls)} time(s); {ref} does not exist")
    return calls[index]


def _build_split(runner: nn.Module, ref: LayerRef) -> _Split:
    """Trace, cut at the layer's node, and build the head and (if needed) the trunk."""
    graph = _KeepLayer(ref.name).trace(runner)
    layer = _find_call(graph, ref)
    dependent = _descendants(layer)
    if not any(n.op == "output" for n in dependent):
        raise LayerError(f"the model's output does not depend on layer {ref}")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]

    # What the head reads from before the layer: parameters and size arithmetic on the
    # input are rebuilt inside the head; values that depend on the input's pixels are
    # computed per image by the trunk; other values (constants) once.
    needed = {a for n in dependent for a in n.all_input_nodes if a is not layer} - dependent
    rebuilt: set[fx.Node] = set()
    per_image, constant = [], []
    for node in (n for n in graph.nodes if n in needed):
        ancestry = _ancestors(node) | {node}
        if node.op == "get_attr" or all(a.op == "placeholder" or _is_shape_op(a) for a in ancestry):
            rebuilt |= ancestry
        elif any(a.op == "placeholder" for a in ancestry):
            per_image.append(node)
        else:
            constant.append(node)
    if any(p in rebuilt for p in placeholders[1:]):
        raise ValueError("the head needs a second model input")

    head = fx.Graph()
    env: dict[fx.Node, fx.Node] = {layer: head.placeholder("activation")}
    env[placeholders[0]] = head.placeholder("inputs")
    for i, node in enumerate(per_image + constant):
        env[node] = head.placeholder(f"saved_{i}")
    for node in graph.nodes:
        if node in dependent or (node in rebuilt and node not in env):
            env[node] = head.node_copy(node, env.__getitem__)
    head_module = fx.GraphModule(runner, head)
    saved = per_image + constant
    if not saved:
        return _Split(head_module, None, 0)
    trunk = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    trunk.graph_copy(graph, copies)
    trunk.output(tuple(copies[n] for n in saved))
    trunk_module = fx.GraphModule(runner, trunk)
    trunk_module.graph.eliminate_dead_code()
    trunk_module.recompile()
    return _Split(head_module, trunk_module, len(per_image))


def _hooked_head(
    runner: nn.Module, ref: LayerRef, inputs: torch.Tensor
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Full forwards of `inputs[rows]` with call `ref.call` of the layer returning the
    given activations instead of its own output."""
    module = get_module(runner, ref.name)
    target_call = ref.call or 0

    def run(activations: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        calls = 0
        token = object()

        def replace(_module, _inputs, output):
            nonlocal calls
            if _replacing.get() is not token:  # another thread's forward of the shared copy
                return output
            calls += 1
            return activations if calls - 1 == target_call else output

        handle = module.register_forward_hook(replace)
        reset = _replacing.set(token)
        try:
            return runner(inputs[rows])
        finally:
            _replacing.reset(reset)
            handle.remove()

    return run
