"""Checks of method options, shared by every family, synthesis and the metrics: each bad
value is a `MethodError` naming the option and what it must be."""

from __future__ import annotations

import functools
import inspect
import numbers
import types
import typing
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cnnscan.errors import MethodError

if TYPE_CHECKING:
    from cnnscan.methods.registry import MethodInfo


def check_options(info: MethodInfo, options: dict[str, Any]) -> None:
    """Reject options the method does not take, naming the ones it does, and values of the
    wrong kind for an option whose signature type is made of plain values (bool, int,
    float, str, Literal choices, None): a bool option takes True or False, not "maybe".
    Structured options (tuples, tensors, mappings) are parsed by their method, which says
    what it expects; ranges and other limits are the method's own checks too."""
    allowed = info.options()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        listing = ", ".join(f"{k}={v!r}" for k, v in allowed.items()) or "none"
        raise MethodError(f"{info.name} has no option {', '.join(unknown)}; its options: {listing}")
    types_ = option_types(info.fn)
    for name, value in options.items():
        kind = types_.get(name, Any)
        if _plain(kind) and not _fits(value, kind):
            raise MethodError(f"{info.name}: {name} must be {_describe(kind)}, got {value!r}")


@functools.cache
def option_types(fn: Any) -> dict[str, Any]:
    """The type of each keyword-only option from the function's annotations (evaluated in
    its module; an annotation that names something only imported for type checkers is
    left unchecked)."""
    found = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.annotation is inspect.Parameter.empty:
            continue
        annotation = p.annotation
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, {**vars(typing), **fn.__globals__})
            except NameError:
                continue
        found[p.name] = annotation
    return found


_PLAIN = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}


def _plain(kind: Any) -> bool:
    """A type made of plain values only: bool, int, float, str, Literal, None, unions."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return all(_plain(arm) for arm in typing.get_args(kind))
    return origin is typing.Literal or kind in _PLAIN or kind is None or kind is type(None)


def _fits(value: Any, kind: Any) -> bool:
    """Whether `value` is of the plain type `kind` (see `_plain`)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arm) for arm in args)
    if origin is typing.Literal:
        return any(value == choice and type(value) is type(choice) for choice in args)
    if kind is None or kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool | np.bool_)
    if kind is int:
        return is_int(value)
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
    return isinstance(value, str)


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in args)
    if origin is typing.Literal:
        return " or ".join(repr(choice) for choice in args)
    return _PLAIN.get(kind, "None")


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def count(name: str, value: Any, minimum: int = 1) -> int:
    """An integer option of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MethodError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def number(name: str, value: Any, *, positive: bool = False) -> float:
    """A finite number option, >= 0 (> 0 with `positive`)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise MethodError(f"{name} must be a number {'>' if positive else '>='} 0, got {value!r}")
    return float(value)


def within_budget(option: str, value: Any, nbytes: float, budget: int) -> None:
    """Refuse an option value whose working set (`nbytes`: what the method must hold at once
    for it, e.g. every random mask and their scores) is over the memory budget (bytes; a
    scan's `memory_budget`), naming the option and the budget, before anything is allocated."""
    if nbytes > budget:
        raise MethodError(
            f"{option}={value!r} needs {_size(nbytes)} of working memory, more than the budget "
            f"of {_size(budget)} (max_memory=, --max-memory or CNNSCAN_MEMORY_MB); lower "
            f"{option} or raise the budget"
        )


def _size(nbytes: float) -> str:
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.1f} GB"
    return f"{nbytes / 2**20:.0f} MB" if nbytes >= 2**20 else f"{nbytes / 2**10:.0f} KB"


def generator(seed: int | None) -> torch.Generator:
    """A CPU generator for a `seed` option (None: fresh entropy): seeded results are the same
    on every device."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
