"""Shared fixtures: the bundled default model is loaded once per test session."""

from __future__ import annotations

import pytest

import cnnscan


@pytest.fixture(scope="session")
def default_model() -> cnnscan.Model:
    """The bundled EfficientNet-Lite0 with its real ImageNet weights (never modify it)."""
    return cnnscan.load_model()


@pytest.fixture(scope="session")
def chelsea():
    """scikit-image's cat photo as an RGB PIL image (ImageNet class 285 for the default model)."""
    return cnnscan.load_image("sample:chelsea")
