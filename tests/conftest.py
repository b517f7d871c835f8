"""Shared fixtures: the bundled default model is loaded once per test session."""

from __future__ import annotations

import pytest
from helpers import DOMESTIC_CATS

import cnnscan


@pytest.fixture(scope="session")
def default_model() -> cnnscan.Model:
    """The bundled EfficientNet-Lite0 with its real ImageNet weights (never modify it)."""
    return cnnscan.load_model()


@pytest.fixture(scope="session")
def chelsea():
    """scikit-image's cat photo as an RGB PIL image (a domestic cat for the default model)."""
    return cnnscan.load_image("sample:chelsea")


@pytest.fixture(scope="session")
def cat_top1(default_model, chelsea) -> tuple[int, str]:
    """(class id, label) the default model puts first for the cat photo: one of ImageNet's
    domestic cats (281–285), whichever the model's own pipeline gives."""
    best = cnnscan.predict(default_model, chelsea, k=1)[0][0]
    assert best["class_id"] in DOMESTIC_CATS, best
    return best["class_id"], best["label"]


@pytest.fixture(scope="session")
def quick_report(tmp_path_factory):
    """`cnnscan scan` of the cat photo with two fast methods and the top 2 classes, run
    in-process once: (exit code, output folder, stdout, stderr)."""
    import contextlib
    import io

    from cnnscan.cli import main

    out = tmp_path_factory.mktemp("quick-report")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(
            [
                "scan",
                "sample:chelsea",
                "--methods",
                "gradient,guided_backprop",
                "--top-k",
                "2",
                "--out",
                str(out),
            ]
        )
    return code, out, stdout.getvalue(), stderr.getvalue()
