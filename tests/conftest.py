"""Shared fixtures: the bundled default model is loaded once per test session; the CAM
tests' three setups (model, input, the module the peer libraries hook, that layer, its name)."""

from __future__ import annotations

import pytest
import torch
import torchvision

import cnnscan
from cnnscan.layers import unshare


@pytest.fixture(scope="session")
def default_model() -> cnnscan.Model:
    """The bundled EfficientNet-Lite0 with its real ImageNet weights (never modify it)."""
    return cnnscan.load_model()


@pytest.fixture(scope="session")
def chelsea():
    """scikit-image's cat photo as an RGB PIL image (ImageNet class 285 for the default model)."""
    return cnnscan.load_image("sample:chelsea")


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
