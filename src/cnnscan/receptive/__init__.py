"""Receptive fields of every layer, computed from the operations a forward really runs
(`fields`), with one rule per operation (`rules`)."""

from cnnscan.receptive.fields import (
    ReceptiveField,
    layer_geometry,
    receptive_fields,
    trace_receptive_fields,
)

__all__ = ["ReceptiveField", "layer_geometry", "receptive_fields", "trace_receptive_fields"]
