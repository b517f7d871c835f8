"""Evaluation: which explanation can a user trust? `evaluate` scores one Attribution,
`evaluate_many` several (sharing forwards), with any registered metric (`list_metrics()`;
faithfulness, localization, sanity checks, robustness, completeness). Importing this package
registers every metric family.
"""

from cnnscan.metrics import (  # noqa: F401  (register the metric families)
    completeness,
    faithfulness,
    infidelity,
    localization,
    removal,
    robustness,
    sanity,
)
from cnnscan.metrics.evaluation import evaluate, evaluate_many
from cnnscan.metrics.registry import (
    Column,
    MetricContext,
    MetricInfo,
    get_metric,
    list_metrics,
    register_metric,
)
from cnnscan.metrics.relevance import REDUCTIONS, random_attribution, relevance

__all__ = [
    "REDUCTIONS",
    "Column",
    "MetricContext",
    "MetricInfo",
    "evaluate",
    "evaluate_many",
    "get_metric",
    "list_metrics",
    "random_attribution",
    "register_metric",
    "relevance",
]
