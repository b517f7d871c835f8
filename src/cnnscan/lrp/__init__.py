"""Layer-wise relevance propagation: rules, composites, and the tracer that applies them.

Use it through `cnnscan.explain(model, image, "lrp", composite=..., rules=...)`; the rule
classes and `Composite` here let you build your own maps, e.g.
`rules={"features.0": ZBox(-2.1, 2.6), nn.Linear: Epsilon(0.25)}`.
"""

from cnnscan.lrp.composites import COMPOSITES, RULE_NAMES, Composite, named_composite
from cnnscan.lrp.rules import AlphaBeta, Epsilon, Flat, Gamma, Pass, Rule, WSquare, ZBox, ZPlus

__all__ = [
    "COMPOSITES",
    "RULE_NAMES",
    "AlphaBeta",
    "Composite",
    "Epsilon",
    "Flat",
    "Gamma",
    "Pass",
    "Rule",
    "WSquare",
    "ZBox",
    "ZPlus",
    "named_composite",
]
