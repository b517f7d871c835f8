"""The method registry: each method is one function registered by name with its metadata,
and `run_method`, which calls one on a scan and wraps the result in an `Attribution`.

A method is called as `fn(scan, targets, **options)` and returns a `MethodResult`; it reads
what it needs from the scan (logits, gradients, activations) and runs new forwards only when
it must perturb the input. Wrappers such as SmoothGrad call any method on derived scans.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from cnnscan.attribution import Attribution
from cnnscan.errors import MethodError
from cnnscan.methods.finite import check_finite, nonfinite_error
from cnnscan.methods.options import check_options
from cnnscan.scan import Rehearsed

if TYPE_CHECKING:
    from cnnscan.scan import Scan
    from cnnscan.targets import Targets


@dataclass
class MethodResult:
    """What a method computed: maps (N, T, C, h, w), the layer it used, anything else.

    A method that explains something other than the requested classes (a layer unit) says
    what in `targets` (N, T) and `scores` (N, T).
    """

    maps: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)
    layer: str | None = None
    targets: torch.Tensor | None = None
    scores: torch.Tensor | None = None


@dataclass(frozen=True)
class MethodInfo:
    """A registered method and what callers need to know about it."""

    name: str
    family: str
    description: str
    fn: Callable[..., MethodResult]
    space: Literal["input", "layer"] = "input"
    signed: bool = True
    relu_rules: bool = False  # its shared forward must use switchable ReLUs
    # A layer map that differentiates the logits themselves (not only through
    # Scan.layer_gradients): its scan must keep the whole forward's autograd graph.
    needs_graph: bool = False
    view: str = "heatmap"  # how reports show it by default (see cnnscan.render.VIEWS)
    cost: str = ""
    paper: str = ""
    in_default_scan: bool = True  # False: too slow for `cnnscan scan` unless --full/--methods
    # Its passes are its own, at other inputs (`Scan.iter_gradients` / `logits_at`), never the
    # shared forward's graph or ReLU switch: a scan may run it beside its other methods. A
    # function of the options where that depends on them.
    own_passes: bool | Callable[[dict[str, Any]], bool] = False

    def runs_apart(self, options: dict[str, Any]) -> bool:
        """True if, with `options`, the method may run beside the scan's other methods."""
        return self.own_passes(options) if callable(self.own_passes) else self.own_passes

    def options(self) -> dict[str, Any]:
        """Keyword options and their defaults."""
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


_REGISTRY: dict[str, MethodInfo] = {}


def register(name: str, **info: Any) -> Callable[[Callable[..., MethodResult]], Callable]:
    """Decorator: add a method function to the registry under `name`."""

    def decorate(fn: Callable[..., MethodResult]) -> Callable[..., MethodResult]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = MethodInfo(name=name, fn=fn, **info)
        return fn

    return decorate


def get_method(name: str) -> MethodInfo:
    """The method called `name`, or a MethodError with close matches."""
    key = name.strip().lower().replace("-", "_")
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key, list(_REGISTRY), n=4, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise MethodError(f"unknown method {name!r}.{hint} Available: {', '.join(_REGISTRY)}")


def get_methods(names: Sequence[str]) -> list[MethodInfo]:
    """The methods called `names`, in order: the one rule for a list of methods at every
    entry point (library, command line, batch runs). An empty list or a method named twice
    (in any spelling) is a MethodError, not silently fixed."""
    if isinstance(names, str):
        names = [names]
    infos = [get_method(name) for name in names]
    if not infos:
        raise MethodError("no methods given; e.g. ['gradcam', 'gradient'] (see list_methods())")
    seen: set[str] = set()
    for name, info in zip(names, infos, strict=True):
        if info.name in seen:
            raise MethodError(f"method {info.name} is named twice ({name!r}); name each once")
        seen.add(info.name)
    return infos


FAMILIES = ("gradient", "cam", "lrp", "perturbation")


def list_methods(family: str | None = None) -> list[MethodInfo]:
    """Every registered method (name, family, one-line description, ...), in family order
    (`FAMILIES`, then any other), each family in registration order."""
    chosen = [m for m in _REGISTRY.values() if family is None or m.family == family]
    rank = {name: i for i, name in enumerate(FAMILIES)}
    return sorted(chosen, key=lambda m: rank.get(m.family, len(FAMILIES)))


def run_method(
    scan: Scan,
    info: MethodInfo,
    targets: Targets,
    layer: str | list[str] | None = None,
    options: dict[str, Any] | None = None,
) -> Attribution:
    """Run one registered method on a scan and wrap its result."""
    options = dict(options or {})
    if layer is not None:
        if "layer" not in info.options():
            raise MethodError(f"{info.name} works in input space and takes no layer")
        options["layer"] = layer
    check_options(info, options)
    if info.relu_rules and not scan.relu_rules:
        scan = scan.derive(scan.inputs, relu_rules=True)
    target_ids = scan.targets(targets)
    try:
        result = info.fn(scan, target_ids, **options)
    except torch.linalg.LinAlgError as e:  # e.g. Eigen-CAM's SVD of activations with NaN
        raise nonfinite_error(scan, info, f"its linear algebra failed ({e})") from e
    check_finite(scan, info, result)
    scores = scan.scores(target_ids) if result.targets is None else result.scores
    return Attribution(
        maps=result.maps,
        targets=target_ids if result.targets is None else result.targets,
        method=info.name,
        inputs=scan.inputs,
        layer=result.layer,
        scores=scores,
        labels=scan.model.labels,
        extras=result.extras,
        preprocessing=scan.model.preprocessing,
        space=info.space,
        default_view=info.view,
    )


def rehearse(
    scan: Scan,
    info: MethodInfo,
    targets: Targets,
    layer: str | list[str] | None = None,
    options: dict[str, Any] | None = None,
) -> None:
    """`run_method` up to the method's first batched pass at other inputs (see
    `Scan.rehearsal`): whatever it would raise about its options, layer, targets or memory
    budget is raised now, at the cost of its cheap part only."""
    with scan.rehearsal(), contextlib.suppress(Rehearsed):
        run_method(scan, info, targets, layer, options)
