"""The metric registry: each metric is one function registered by name with what callers
need to know (which way is better, whether it needs an object region, whether it re-runs
the explanation method, what it costs). `evaluate`, the leaderboard, batch runs, the
command line and the app all read this registry, so a new metric is one function here.

A metric is called as `fn(context)` with a `MetricContext` holding every attribution of the
call, their relevance (one reduction for all metrics) and the options, and returns
{attribution name: {column: value}}: one value per (image, target) as an (N, T) tensor, or
any plain structure (a dict of curves, a check's verdicts).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from cnnscan.errors import MetricError

if TYPE_CHECKING:
    from cnnscan.attribution import Attribution
    from cnnscan.models import Model
    from cnnscan.scan import Scan

FAMILIES = ("faithfulness", "localization", "sanity", "robustness", "completeness")


@dataclass
class MetricContext:
    """What every metric of one `evaluate_many` call shares.

    `rel` maps each attribution name to its relevance (N, T, H, W); `stacked` holds every
    map of every attribution as one (M, H, W) batch with its image and target per row
    (`image_ids`, `target_ids`), so a metric perturbs the inputs for all maps in one batched
    pass and `split` turns its (M, ...) results back into (N, T, ...) per attribution;
    `shared` keeps what several metrics of the call compute together (e.g. the re-runs
    behind max- and avg-sensitivity). `regions` is the object region (H, W) per image on the
    model input, or None per image without one. The rest are the options of `evaluate_many`.
    """

    model: Model
    scan: Scan
    attrs: Mapping[str, Attribution]
    rel: Mapping[str, torch.Tensor]
    regions: list[torch.Tensor | None] | None = None
    steps: int = 50
    substrate: str | torch.Tensor | None = None
    reduce: str = "abs"
    tolerance: int = 15
    cascade: bool = False
    threshold: float = 0.9
    n_samples: int = 10
    noise_level: float = 0.02
    method_options: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0
    progress: Callable[[int], object] | None = None
    shared: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.names = list(self.attrs)
        self.stacked = torch.cat([self.rel[name].flatten(0, 1) for name in self.names])
        device = self.stacked.device
        shapes = [tuple(self.attrs[name].targets.shape) for name in self.names]
        self.image_ids = torch.cat(
            [torch.arange(n, device=device).repeat_interleave(t) for n, t in shapes]
        )
        self.target_ids = torch.cat(
            [self.attrs[name].targets.flatten().to(device) for name in self.names]
        )
        self._shapes = shapes

    def split(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """(M, ...) values of the stacked maps -> {name: (N, T, ...)}."""
        parts = values.split([n * t for n, t in self._shapes])
        return {
            name: part.reshape(*shape, *part.shape[1:])
            for name, part, shape in zip(self.names, parts, self._shapes, strict=True)
        }


def number_text(value: Any, digits: int = 3) -> str:
    """A table cell for a score: fixed digits, "-" for a missing one."""
    if isinstance(value, float) and not math.isnan(value):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


@dataclass(frozen=True)
class Column:
    """One key of a metric's result as a table column: its title and how a value reads."""

    key: str
    title: str
    show: Callable[[Any], str] = number_text


@dataclass(frozen=True)
class MetricInfo:
    """A registered metric and what callers need to know about it.

    `higher_is_better`: True/False for a score, None for a check that gives verdicts.
    `columns`: the keys of its result shown in tables (batch columns too when `per_row`:
    one number per (image, target); False for a check's per-block verdicts). `reference`:
    scored on the chance-level random maps of the leaderboard too. `default`: evaluated
    when no metrics are named. `forwards_only`: its work is forwards without gradients
    (`Scan.logits_at`), so it may run in a lane beside other metrics.
    """

    name: str
    fn: Callable[[MetricContext], dict[str, dict[str, Any]]]
    family: str
    description: str
    higher_is_better: bool | None
    needs_region: bool = False
    reruns_method: bool = False
    per_row: bool = True
    reference: bool = False
    default: bool = True
    forwards_only: bool = False
    columns: tuple[Column, ...] = ()
    aliases: tuple[str, ...] = ()
    cost: str = ""
    paper: str = ""


_REGISTRY: dict[str, MetricInfo] = {}


def register_metric(
    name: str, *, title: str = "", show: Callable[[Any], str] = number_text, **info: Any
) -> Callable[[Callable[[MetricContext], dict]], Callable[[MetricContext], dict]]:
    """Decorator: add a metric function to the registry under `name`. A one-column metric
    gives its table `title` (and `show`); others give `columns=(Column(...), ...)`."""

    def decorate(fn: Callable[[MetricContext], dict]) -> Callable[[MetricContext], dict]:
        if name in _REGISTRY:
            raise ValueError(f"metric {name!r} is registered twice")
        columns = info.pop("columns", None) or (Column(name, title or name, show),)
        _REGISTRY[name] = MetricInfo(name=name, fn=fn, columns=columns, **info)
        return fn

    return decorate


def list_metrics(family: str | None = None) -> list[MetricInfo]:
    """Every registered metric, in family order (`FAMILIES`), each in registration order."""
    chosen = [m for m in _REGISTRY.values() if family is None or m.family == family]
    rank = {name: i for i, name in enumerate(FAMILIES)}
    return sorted(chosen, key=lambda m: rank.get(m.family, len(FAMILIES)))


def get_metric(name: str) -> MetricInfo:
    """The metric called `name` (or one of its aliases), or a MetricError with close matches."""
    key = name.strip().lower().replace("-", "_")
    for info in _REGISTRY.values():
        if key == info.name or key in info.aliases:
            return info
    names = [info.name for info in list_metrics()]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise MetricError(f"unknown metric {name!r}.{hint} Metrics: {', '.join(names)}")


def choose_metrics(names: Sequence[str] | str | None, has_region: bool) -> list[MetricInfo]:
    """The metrics to evaluate: the named ones (checked, duplicates dropped), or the default
    set plus those that need a region when one is given."""
    if names is None:
        return [m for m in list_metrics() if m.default and (has_region or not m.needs_region)]
    chosen = list(
        dict.fromkeys(get_metric(n) for n in ([names] if isinstance(names, str) else names))
    )
    missing = [m.name for m in chosen if m.needs_region and not has_region]
    if missing:
        raise MetricError(f"{', '.join(missing)} need a region: pass box=(x0, y0, x1, y1) or mask=")
    return chosen


def plain(values: torch.Tensor | list) -> Any:
    """(N, T) values -> a float for one pair, else nested lists (NaN kept as float nan)."""
    listed = values.tolist() if isinstance(values, torch.Tensor) else values
    if len(listed) == 1 and len(listed[0]) == 1:
        return listed[0][0]
    return listed
