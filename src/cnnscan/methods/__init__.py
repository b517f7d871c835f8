"""Explanation methods: the registry (`registry`), one module per family (`gradient` with
`deeplift`, `layer_attribution`, `ig_blur`, `ig_guided` and `xrai`, `cam` with `cam_activation`
and `cam_perturbation`, `lrp` with `excitation`, `perturbation` with `extremal`), and the
pieces they share (`baselines`, `superpixels`, `options`). Importing this package registers
every family."""

from cnnscan.methods import (  # noqa: F401  (register the families)
    cam,
    cam_activation,
    cam_perturbation,
    deeplift,
    excitation,
    extremal,
    gradient,
    ig_blur,
    ig_guided,
    layer_attribution,
    lrp,
    perturbation,
    xrai,
)
from cnnscan.methods.options import check_options
from cnnscan.methods.registry import (
    FAMILIES,
    MethodInfo,
    MethodResult,
    get_method,
    get_methods,
    list_methods,
    register,
    rehearse,
    run_method,
)

__all__ = [
    "FAMILIES",
    "MethodInfo",
    "MethodResult",
    "check_options",
    "get_method",
    "get_methods",
    "list_methods",
    "register",
    "rehearse",
    "run_method",
]
