"""What a network learned, as pictures: activation maximization, class images, DeepDream
and inverted representations, built from small swappable pieces (objectives, image
parameterizations, robustness transforms) in the style of lucid/lucent."""

from cnnscan.synthesis.dream import deepdream
from cnnscan.synthesis.inversion import features, invert
from cnnscan.synthesis.objectives import (
    Objective,
    Probe,
    alpha_norm,
    as_objective,
    channel,
    channels,
    class_logit,
    diversity,
    feature_match,
    l2,
    layer_norm,
    neuron,
    total_variation,
)
from cnnscan.synthesis.result import Synthesis
from cnnscan.synthesis.run import class_image, synthesize

__all__ = [
    "Objective",
    "Probe",
    "Synthesis",
    "alpha_norm",
    "as_objective",
    "channel",
    "channels",
    "class_image",
    "class_logit",
    "deepdream",
    "diversity",
    "feature_match",
    "features",
    "invert",
    "l2",
    "layer_norm",
    "neuron",
    "synthesize",
    "total_variation",
]
