"""Concepts (CRP): which channels of a layer carried a prediction's relevance, where they
are in the image, and what they look like."""

from cnnscan.concept.graph import Node, concept_graph
from cnnscan.concept.relevance import Ablation
from cnnscan.concept.result import Concept, Concepts, Patch, TargetConcepts
from cnnscan.concept.run import concepts

__all__ = [
    "Ablation",
    "Concept",
    "Concepts",
    "Node",
    "Patch",
    "TargetConcepts",
    "concept_graph",
    "concepts",
]
