"""`Scan`: one forward of a batch of images, cached and shared by every method.

It keeps the logits, the activations of requested layers and the gradients of any number
of targets (with respect to the input, or to a layer, where autograd only runs through the
part of the network after that layer). Methods ask the scan; only methods that must
perturb the input run new forwards, through `gradients_at` / `logits_at`, which run them
in batches of a fixed size within the memory budget.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from cnnscan.engine.batch_size import fixed_batches, max_batch_for, memory_budget_bytes
from cnnscan.engine.folding import folded_working_copy
from cnnscan.engine.head import Head, head_of
from cnnscan.engine.incremental import PatchedForward, patched_forward
from cnnscan.engine.inference import Forward, engine_for
from cnnscan.engine.logits import check_logits, logits_of
from cnnscan.engine.relu_rules import ReluRule, RuleSwitch, switchable_relus
from cnnscan.engine.rescale import rescaled_nonlinearities
from cnnscan.engine.working_copy import memory_format_of, runnable
from cnnscan.errors import MethodError
from cnnscan.layers import LayerRef, LayerRow, capture, default_layer, get_module, trace_layers
from cnnscan.models import Model, ModelLike, as_model
from cnnscan.targets import Targets, resolve_targets

if TYPE_CHECKING:
    from cnnscan.methods.registry import MethodInfo


class Rehearsed(Exception):
    """Raised at the first batched pass of a scan in rehearsal (see `Scan.rehearsal`)."""


class Indexable(Protocol):
    """A batch of inputs that may be built lazily, chunk by chunk."""

    def __len__(self) -> int: ...
    def __getitem__(self, rows: slice) -> torch.Tensor: ...


class Scan:
    """The shared cache of one forward pass of `inputs` (N, 3, H, W) through `model`.

    `relu_rules=True` runs the forward with switchable ReLUs so that guided backprop and
    DeconvNet reuse it. With `layers=None` the forward records every module's output (and
    the layer table), so any layer is available without another forward; otherwise only
    `layers` are recorded and others cost one more forward on first request.
    """

    def __init__(
        self,
        model: Model | nn.Module | str | None,
        inputs: torch.Tensor,
        *,
        layers: Sequence[str] | None = None,
        relu_rules: bool = True,
        device: torch.device | str | None = None,
        batch_size: int | None = None,
        max_memory: int | float | str | None = None,
        graph: bool = True,
    ):
        self.model = as_model(model)
        self.device = torch.device(device) if device is not None else self.model.device
        if inputs.ndim == 3:
            inputs = inputs.unsqueeze(0)
        if inputs.ndim != 4 or inputs.shape[1] != 3 or not inputs.is_floating_point():
            raise ValueError(
                f"inputs must be a float tensor (N, 3, H, W); got {tuple(inputs.shape)} "
                f"{inputs.dtype}. Images go through cnnscan.load_image / model.preprocess."
            )
        self.inputs = inputs.detach().to(self.device)
        self.relu_rules = relu_rules
        self.batch_size = batch_size
        try:  # checked before any work
            self.memory_budget = memory_budget_bytes(max_memory)  # bytes
        except ValueError as e:
            raise MethodError(str(e)) from None
        self.switch = RuleSwitch()
        self._capture_all = layers is None
        self._layers: list[LayerRef] = [LayerRef.parse(layer) for layer in layers or ()]
        self._input_grads: dict[tuple, torch.Tensor] = {}
        self._layer_grads: dict[tuple, torch.Tensor] = {}
        self._heads: dict[LayerRef, Head] = {}
        self._layer_rows: list[LayerRow] | None = None
        self._protected: set[str] = set()  # recorded as copies: a later in-place op hit them
        self._rehearsing = False
        self._detached: dict[LayerRef, torch.Tensor] = {}  # layer outputs of a graph-free forward
        if graph or self._capture_all:
            self._forward()
        else:
            self._forward_without_graph()

    # -- the shared forward -------------------------------------------------------------
    def _forward(self) -> None:
        with ExitStack() as stack:
            runner = stack.enter_context(runnable(self.model.module, self.device))
            layers = None if self._capture_all else self._layers
            protect = self._protected if self._capture_all else None
            captured = stack.enter_context(capture(runner, layers, protect))
            if self.relu_rules:
                stack.enter_context(switchable_relus(self.switch))
            saved = stack.enter_context(_saved_bytes(runner.parameters()))
            x = match_format(self.inputs, runner).requires_grad_(True)
            logits = logits_of(runner(x))
        check_logits(logits)
        self._x, self.logits, self._captured = x, logits, captured
        self.bytes_per_item = saved.total // len(x)
        if self._capture_all:
            self._layer_rows = captured.rows()

    def _forward_without_graph(self) -> None:
        """The logits and the requested layers' outputs with no autograd graph, for work that
        needs nothing else (a batch of layer maps): through ONNX Runtime where it gives
        torch's numbers, else torch. Layer gradients then run through the part of the
        network after the layer (`head`); a request that needs the graph runs the forward."""
        names = tuple(str(ref) for ref in self._layers)
        with self.runner() as runner:
            copied = runner is not self.model.module  # a borrowed user module is never exported
            engine = (
                engine_for(self.model.module, runner, self.inputs[:1], names) if copied else None
            )
            if engine is not None:
                logits, *outputs = engine.outputs(self.inputs)
            else:
                with capture(runner, list(self._layers)) as captured, torch.no_grad():
                    logits = logits_of(runner(match_format(self.inputs, runner)))
                outputs = [captured[ref] for ref in self._layers]
        check_logits(logits)
        self.logits = logits.to(self.device)
        self._detached = {
            ref: out.to(self.device) for ref, out in zip(self._layers, outputs, strict=True)
        }
        self._x = self._captured = None
        self.bytes_per_item = sum(out[0].numel() * out.element_size() for out in outputs)

    def release(self) -> None:
        """Free the shared forward's autograd graph and recorded activations (the largest
        part of a scan's memory) and keep the logits, the layer table and every cached
        gradient; a later request that needs the graph runs the forward again."""
        self.logits = self.logits.detach()
        self._x = self._captured = None
        self._heads.clear()

    def _graph(self) -> None:
        """The shared forward's graph, run again if `release` freed it."""
        if self._x is None:
            self._forward()

    @property
    def probabilities(self) -> torch.Tensor:
        return self.logits.detach().softmax(dim=1)

    def top(self, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, class ids), each (N, k), best first."""
        return self.probabilities.topk(min(k, self.logits.shape[1]), dim=1)

    def predictions(self, k: int = 5) -> list[list[dict[str, Any]]]:
        """The top-k table per image: [{rank, class_id, label, probability, logit}, ...]."""
        probabilities, ids = self.top(k)
        logits = self.logits.detach()
        return [
            [
                {
                    "rank": rank + 1,
                    "class_id": int(class_id),
                    "label": self.model.labels[int(class_id)],
                    "probability": float(probability),
                    "logit": float(logits[i, int(class_id)]),
                }
                for rank, (probability, class_id) in enumerate(zip(row_p, row_ids, strict=True))
            ]
            for i, (row_p, row_ids) in enumerate(zip(probabilities, ids, strict=True))
        ]

    def targets(self, targets: Targets) -> torch.Tensor:
        """Resolve user targets against this scan's logits: LongTensor (N, T)."""
        return resolve_targets(targets, self.logits, self.model.labels)

    def scores(self, targets: torch.Tensor) -> torch.Tensor:
        """Target logits (N, T)."""
        return self.logits.detach().gather(1, targets)

    # -- gradients w.r.t. the input ----------------------------------------------------
    def input_gradients(self, targets: torch.Tensor, rule: ReluRule = "standard") -> torch.Tensor:
        """d logit[target] / d input for every target: (N, T, 3, H, W), from the shared forward."""
        if rule != "standard" and not self.relu_rules:
            raise RuntimeError(f"the {rule!r} rule needs a Scan made with relu_rules=True")
        columns = []
        for t in range(targets.shape[1]):
            key = (rule, tuple(targets[:, t].tolist()))
            if key not in self._input_grads:
                self._graph()
                selected = self.logits.gather(1, targets[:, t : t + 1]).sum()
                with self.switch.use(rule):
                    (grad,) = torch.autograd.grad(selected, self._x, retain_graph=True)
                self._input_grads[key] = grad.contiguous()
            columns.append(self._input_grads[key])
        return torch.stack(columns, dim=1)

    def input_gradients_of(
        self, output: torch.Tensor, seed: torch.Tensor, rule: ReluRule = "standard"
    ) -> torch.Tensor:
        """d ⟨output, seed⟩ / d input (N, 3, H, W) for a tensor of the shared forward's graph
        (e.g. `activations(layer)`: a unit's gradient), through the ReLUs by `rule`."""
        if rule != "standard" and not self.relu_rules:
            raise RuntimeError(f"the {rule!r} rule needs a Scan made with relu_rules=True")
        self._graph()
        with self.switch.use(rule):
            (grad,) = torch.autograd.grad(output, self._x, grad_outputs=seed, retain_graph=True)
        return grad.contiguous()

    def iter_gradients(
        self, inputs: Indexable, targets: torch.Tensor, rule: ReluRule = "standard"
    ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """Gradients at other inputs, chunk by chunk: yields (rows, grads (b, T, 3, H, W),
        target logits (b, T)). `inputs` is a tensor (M, 3, H, W) or anything with len() and
        slicing that builds one lazily; `targets` is (M, T). Forwards run in batches of a fixed
        size, BatchNorm folded.
        """
        shape = tuple(inputs[0:1].shape[1:])
        key = ("gradients", shape, targets.shape[1], rule != "standard")
        with self._folded_runner() as runner:
            for rows in self.batches(len(inputs), key):
                with ExitStack() as stack:
                    if rule != "standard":
                        stack.enter_context(switchable_relus(RuleSwitch(rule)))
                    x = match_format(inputs[rows], runner).requires_grad_(True)
                    logits = logits_of(runner(x))
                check_logits(logits)
                selected = logits.gather(1, targets[rows])
                grads = x.new_empty((len(x), *selected.shape[1:], *shape))
                for t in range(selected.shape[1]):
                    last = t == selected.shape[1] - 1
                    (grads[:, t],) = torch.autograd.grad(
                        selected[:, t].sum(), x, retain_graph=not last
                    )
                yield rows, grads, selected.detach()

    def gradients_at(
        self, inputs: torch.Tensor, targets: torch.Tensor, rule: ReluRule = "standard"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All of `iter_gradients` at once: (M, T, 3, H, W) gradients, (M, T) target logits."""
        grads = inputs.new_empty((*targets.shape, *inputs.shape[1:]))
        scores = inputs.new_empty(targets.shape)
        for rows, chunk_grads, chunk_scores in self.iter_gradients(inputs, targets, rule):
            grads[rows], scores[rows] = chunk_grads, chunk_scores
        return grads, scores

    def iter_multipliers(
        self, inputs: Indexable, references: Indexable, targets: torch.Tensor
    ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """DeepLIFT's multipliers of the target logits at other inputs against references,
        chunk by chunk: yields (rows, multipliers (b, T, 3, H, W), target logits of the
        inputs minus those of the references (b, T)). Each chunk is one forward of
        [inputs[rows]; references[rows]] whose nonlinearities backpropagate Δout/Δin
        (`cnnscan.engine.rescale`), BatchNorm folded; `targets` is (M, T)."""
        shape = tuple(inputs[0:1].shape[1:])
        key = ("multipliers", shape, targets.shape[1])
        with self._folded_runner() as runner:
            for rows in self.batches(len(inputs), key, per_item=2 * self.bytes_per_item):
                pair = torch.cat([inputs[rows], references[rows]])
                with rescaled_nonlinearities():
                    x = match_format(pair, runner).requires_grad_(True)
                    logits = logits_of(runner(x))
                check_logits(logits)
                b = len(pair) // 2
                selected = logits.gather(1, targets[rows].repeat(2, 1))
                grads = x.new_empty((b, selected.shape[1], *shape))
                for t in range(selected.shape[1]):
                    last = t == selected.shape[1] - 1
                    (grad,) = torch.autograd.grad(selected[:, t].sum(), x, retain_graph=not last)
                    grads[:, t] = grad[:b]
                scores = selected.detach()
                yield rows, grads, scores[:b] - scores[b:]

    def derive(self, inputs: torch.Tensor, *, relu_rules: bool | None = None) -> Scan:
        """A scan of other inputs (e.g. noisy copies) with this scan's model and settings;
        it records only the layers this scan was asked for."""
        derived = Scan(
            self.model,
            inputs,
            layers=[str(ref) for ref in self._layers],
            relu_rules=self.relu_rules if relu_rules is None else relu_rules,
            device=self.device,
            batch_size=self.batch_size,
        )
        derived.memory_budget = self.memory_budget
        derived._rehearsing = self._rehearsing
        if tuple(inputs.shape[1:]) == tuple(self.inputs.shape[1:]):
            derived._layer_rows = self._layer_rows
        return derived

    @contextmanager
    def rehearsal(self) -> Iterator[None]:
        """Inside the block the first batched pass at other inputs (`batches`, under every
        `logits_at` and `iter_gradients`) raises `Rehearsed` instead of running: a method
        runs its checks (options, layer, targets, memory budget) and the cheap work before
        them, so settings can be tried on one image before a long run."""
        self._rehearsing = True
        try:
            yield
        finally:
            self._rehearsing = False

    def batches(self, total: int, key: tuple, per_item: int | None = None) -> Iterator[slice]:
        """Slices of range(total) in order, at the scan's `batch_size` or the preferred size
        (`cnnscan.engine.batch_size`), cut to the memory budget at `per_item` bytes an item:
        fixed by the work, never by timing, so the same call gives the same bits. `key`
        names the work (e.g. ("logits_at", shape))."""
        if self._rehearsing:
            raise Rehearsed(key[0] if key else "a batched pass")
        per_item = per_item if per_item is not None else self.bytes_per_item
        limit = max_batch_for(per_item, budget=self.memory_budget)
        return fixed_batches(total, limit, self.batch_size)

    def logits_at(
        self, inputs: Indexable, progress: Callable[[int], object] | None = None
    ) -> torch.Tensor:
        """Logits (M, classes) at other inputs (a tensor, or built lazily chunk by chunk),
        without gradients, in batches of a fixed size, by the fastest engine that gives torch's
        numbers (`inference_engine`); `progress(n)` after each chunk of n."""
        out = []
        shape = tuple(inputs[0:1].shape[1:])
        chunks = self.batches(len(inputs), ("logits_at", shape), self.bytes_per_item // 4)
        with self.inference_engine(shape) as (_, forward):
            for chunk in chunks:
                logits = forward(inputs[chunk])
                check_logits(logits)
                out.append(logits.to(self.device))
                if progress is not None:
                    progress(len(logits))
        return torch.cat(out)

    @contextmanager
    def inference_engine(self, shape: tuple[int, ...]) -> Iterator[tuple[str, Forward]]:
        """(name, forward) for passes without gradients at inputs of `shape`: ONNX Runtime
        when it gives torch's logits within float32 rounding (`cnnscan.engine.inference`),
        else the BatchNorm-folded torch copy."""
        if shape == tuple(self.inputs.shape[1:]):
            with self.runner() as runner:  # a borrowed user module is never exported
                copied = runner is not self.model.module
                engine = engine_for(self.model.module, runner, self.inputs[:1]) if copied else None
            if engine is not None:
                yield "onnxruntime", engine
                return
        with self._folded_runner() as runner, torch.no_grad():
            yield "torch", lambda x: logits_of(runner(match_format(x, runner)))

    def prepare_inference(self) -> threading.Thread:
        """Build the inference engine for this scan's input shape in the background (an
        export takes seconds the first time a model is seen); `logits_at` waits for it."""

        def build() -> None:
            with self.inference_engine(tuple(self.inputs.shape[1:])):
                pass

        thread = threading.Thread(target=build, name="cnnscan-engine", daemon=True)
        thread.start()
        return thread

    # -- layers ------------------------------------------------------------------------
    def layer_table(self) -> list[LayerRow]:
        """Every module call with its output shape and parameter count (one extra forward)."""
        if self._layer_rows is None:
            with self.runner() as runner:
                self._layer_rows = trace_layers(runner, self.inputs[:1])
        return self._layer_rows

    def default_layer(self) -> str:
        return default_layer(self.layer_table())

    def activations(self, layer: str | LayerRef) -> torch.Tensor:
        """The output of `layer` for this batch, still in the autograd graph."""
        ref = LayerRef.parse(layer)
        get_module(self.model.module, ref.name)  # unknown names: an error listing valid ones
        if self._x is None and ref in self._detached:
            return self._detached[ref]
        self._graph()
        if ref not in self._layers:
            self._layers.append(ref)
            if not self._capture_all:
                self._forward()  # re-records the requested layers; cached gradients stay valid
        if self._captured.overwritten(ref):  # e.g. ResNet's `out += identity` after bn2
            self._protected.add(ref.name)
            self._forward()
        return self._captured[ref]

    @contextmanager
    def head(self, layer: str | LayerRef) -> Iterator[Head]:
        """The part of the network after `layer` (logits from replacement activations),
        usable inside the block only: a borrowed model is in eval mode just that long."""
        ref = LayerRef.parse(layer)
        with self.runner() as runner:
            if ref not in self._heads:
                self._heads[ref] = head_of(runner, ref, match_format(self.inputs, runner))
            yield self._heads[ref]

    @contextmanager
    def patched(self, image: int = 0) -> Iterator[PatchedForward | None]:
        """Forwards of copies of image `image` that differ from it only inside a box, by
        incremental inference (see `cnnscan.engine.incremental`), usable inside the block only;
        None if the model does not trace (then use `logits_at`)."""
        with self._folded_runner() as runner:
            yield patched_forward(runner, match_format(self.inputs[image : image + 1], runner))

    def layer_gradients(self, layer: str | LayerRef, targets: torch.Tensor) -> torch.Tensor:
        """d logit[target] / d activations for every target: (N, T, *activation shape).

        Autograd runs only through the part of the network after the layer. A target whose
        logit does not depend on the layer gets zeros.
        """
        ref = LayerRef.parse(layer)
        if self._x is None and ref in self._detached:
            return self._head_gradients(ref, targets)
        acts = self.activations(ref)
        columns = []
        for t in range(targets.shape[1]):
            key = (ref, tuple(targets[:, t].tolist()))
            if key not in self._layer_grads:
                selected = self.logits.gather(1, targets[:, t : t + 1]).sum()
                with self.switch.use("standard"):
                    (grad,) = torch.autograd.grad(
                        selected, acts, retain_graph=True, allow_unused=True
                    )
                self._layer_grads[key] = torch.zeros_like(acts) if grad is None else grad
            columns.append(self._layer_grads[key])
        return torch.stack(columns, dim=1)

    def _head_gradients(self, ref: LayerRef, targets: torch.Tensor) -> torch.Tensor:
        """`layer_gradients` of a graph-free scan: the part after the layer runs again on
        its recorded output, with gradients."""
        missing = [
            t
            for t in range(targets.shape[1])
            if (ref, tuple(targets[:, t].tolist())) not in self._layer_grads
        ]
        if missing:
            with self.head(ref) as head:
                acts = self._detached[ref].detach().requires_grad_(True)
                logits = head(acts, torch.arange(len(acts), device=acts.device))
                for i, t in enumerate(missing):
                    selected = logits.gather(1, targets[:, t : t + 1]).sum()
                    (grad,) = torch.autograd.grad(
                        selected, acts, retain_graph=i < len(missing) - 1, allow_unused=True
                    )
                    key = (ref, tuple(targets[:, t].tolist()))
                    self._layer_grads[key] = torch.zeros_like(acts) if grad is None else grad
        return torch.stack(
            [
                self._layer_grads[(ref, tuple(targets[:, t].tolist()))]
                for t in range(targets.shape[1])
            ],
            dim=1,
        )

    def layer_gradients_of(
        self, layer: str | LayerRef, output: torch.Tensor, *, create_graph: bool = False
    ) -> torch.Tensor:
        """d Σ output / d activations(layer) for a tensor computed from this scan's `logits`
        (a contrast of classes, a softmax utility), through the part after the layer; zeros
        if it does not depend on the layer. `create_graph` keeps the result differentiable
        (second derivatives w.r.t. the activations)."""
        acts = self.activations(layer)
        with self.switch.use("standard"):
            (grad,) = torch.autograd.grad(
                output.sum(), acts, retain_graph=True, create_graph=create_graph, allow_unused=True
            )
        return torch.zeros_like(acts) if grad is None else grad

    def input_and_layer_gradients(
        self, targets: torch.Tensor, layers: Sequence[str | LayerRef]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """d logit[target] / d input (N, T, 3, H, W) and / d the output of each of `layers`
        ((N, T, *shape) each, zeros where a layer does not reach the logit), from one backward
        per target for all of them (FullGrad reads dozens of layers)."""
        refs = [LayerRef.parse(layer) for layer in layers]
        for ref in refs:
            get_module(self.model.module, ref.name)
        missing = [ref for ref in refs if ref not in self._layers]
        self._layers.extend(missing)
        if missing and not self._capture_all:
            self._forward()
        overwritten = {ref.name for ref in refs if self._captured.overwritten(ref)}
        if overwritten:  # one more forward protects all of them at once
            self._protected |= overwritten
            self._forward()
        acts = [self._captured[ref] for ref in refs]
        inputs, per_layer = [], [[] for _ in refs]
        for t in range(targets.shape[1]):
            selected = self.logits.gather(1, targets[:, t : t + 1]).sum()
            with self.switch.use("standard"):
                grads = torch.autograd.grad(
                    selected, [self._x, *acts], retain_graph=True, allow_unused=True
                )
            inputs.append(grads[0])
            for i, (grad, act) in enumerate(zip(grads[1:], acts, strict=True)):
                per_layer[i].append(torch.zeros_like(act) if grad is None else grad)
        return torch.stack(inputs, dim=1), [torch.stack(g, dim=1) for g in per_layer]

    # -- running the model ---------------------------------------------------------------
    @contextmanager
    def runner(self) -> Iterator[nn.Module]:
        """The model ready to run (eval mode, frozen parameters; a private working copy where
        it can be copied), for a method that makes its own forward (LRP); the user's module is
        left as it was."""
        with runnable(self.model.module, self.device) as runner:
            yield runner

    @staticmethod
    def checked_logits(output: object) -> torch.Tensor:
        """The (N, classes) logits in a forward's output, or a ModelError (not logits, NaN/Inf,
        probabilities)."""
        logits = logits_of(output)
        check_logits(logits)
        return logits

    @contextmanager
    def _folded_runner(self) -> Iterator[nn.Module]:
        """The working copy with BatchNorm folded (`cnnscan.engine.folding`): the same function and
        input gradients, a third faster on the default model; for passes that read no layer
        (hooks would miss folded BatchNorms). A borrowed (uncopyable) model runs as it is."""
        with self.runner() as runner:
            yield folded_working_copy(runner, self.model.module)


def match_format(x: torch.Tensor, runner: nn.Module) -> torch.Tensor:
    """Give the input the memory format of the working copy's convolutions (a copy)."""
    return x.contiguous(memory_format=memory_format_of(runner)).clone()


class _SavedBytes:
    total = 0


@contextmanager
def _saved_bytes(shared: Iterable[torch.Tensor]) -> Iterator[_SavedBytes]:
    """Count the bytes autograd saves for backward during the block (the graph's memory),
    leaving out `shared` tensors such as the parameters."""
    counter = _SavedBytes()
    seen = {t.untyped_storage().data_ptr() for t in shared}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            counter.total += storage.nbytes()
        return tensor

    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield counter


def make_scan(
    model: ModelLike,
    image: Any,
    methods: Sequence[MethodInfo] = (),
    *,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    max_memory: int | float | str | None = None,
) -> Scan:
    """One shared forward of `image` (a path, picture, list of them or a preprocessed
    tensor) for `methods` (switchable ReLUs only if one of them needs them)."""
    model = as_model(model)
    device = torch.device(device) if device is not None else model.device
    return Scan(
        model,
        model.inputs(image, device),
        relu_rules=any(m.relu_rules for m in methods),
        device=device,
        batch_size=batch_size,
        max_memory=max_memory,
    )
