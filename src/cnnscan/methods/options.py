"""Checks of method options, shared by every family, synthesis and the metrics: each bad
value is a `MethodError` naming the option and what it must be."""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cnnscan.errors import MethodError

if TYPE_CHECKING:
    from cnnscan.methods.registry import MethodInfo


def check_options(info: MethodInfo, options: dict[str, Any]) -> None:
    """Reject options the method does not take, naming the ones it does."""
    allowed = info.options()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        listing = ", ".join(f"{k}={v!r}" for k, v in allowed.items()) or "none"
        raise MethodError(f"{info.name} has no option {', '.join(unknown)}; its options: {listing}")


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


def generator(seed: int | None) -> torch.Generator:
    """A CPU generator for a `seed` option (None: fresh entropy): seeded results are the same
    on every device."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
