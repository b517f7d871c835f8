"""Shared fixtures: the bundled default model is loaded once per test session; the CAM
tests' three setups (model, input, the module the peer libraries hook, that layer, its name)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import DOMESTIC_CATS

import cnnscan
from cnnscan.layers import unshare


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Exported inference graphs go to a folder of the test session, not the user's cache."""
    before = os.environ.get("CNNSCAN_CACHE")
    os.environ["CNNSCAN_CACHE"] = str(tmp_path_factory.mktemp("cnnscan-cache"))
    yield
    if before is None:
        os.environ.pop("CNNSCAN_CACHE", None)
    else:
        os.environ["CNNSCAN_CACHE"] = before


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


def run_scan_command(out: Path, *args: str) -> tuple[int, Path, str, str]:
    """`cnnscan scan ARGS --out OUT` run in-process: (exit code, OUT, stdout, stderr)."""
    import contextlib
    import io

    from cnnscan.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["scan", *args, "--out", str(out)])
    return code, out, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="session")
def quick_report(tmp_path_factory):
    """`cnnscan scan` of the cat photo with two fast methods and the top 2 classes, run
    in-process once: (exit code, output folder, stdout, stderr)."""
    out = tmp_path_factory.mktemp("quick-report")
    return run_scan_command(
        out, "sample:chelsea", "--methods", "gradient,guided_backprop", "--top-k", "2"
    )


@pytest.fixture(scope="session")
def default_report(tmp_path_factory):
    """`cnnscan scan` with every default (the default methods, top 5, class image and
    leaderboard of the cat photo), run in-process once: (exit code, output folder, stdout,
    stderr). Minutes on a CPU: for slow tests only."""
    return run_scan_command(tmp_path_factory.mktemp("default-report"))


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser():
    """Debian's headless Chromium driven by Playwright (never `playwright install`)."""
    if not CHROMIUM.exists():
        pytest.fail(
            "the browser tests need Debian's chromium: apt-get update && "
            "DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver"
        )
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=180_000)  # the app's first page also loads the model
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def cam_default():
    model = cnnscan.load_model()
    x = model.preprocess("sample:chelsea")
    # Peers hook modules: give the head's call of the shared `_swish` its own module.
    peer = unshare(model.module, "_swish", x).eval()
    return model, x, peer, peer._swish.calls[1], "_swish@1"


@pytest.fixture(scope="module")
def cam_resnet18():
    torch.manual_seed(0)
    module = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    return cnnscan.load_model(module), x, module, module.layer4, "layer4"


@pytest.fixture(scope="module")
def cam_vgg11():
    torch.manual_seed(0)
    module = torchvision.models.vgg11(weights=None).eval()
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    return cnnscan.load_model(module), x, module, module.features, "features"
