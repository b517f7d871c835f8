"""Issue 16, item 3: limits are enforced, not clamped silently or left to the allocator:
top-k above the number of classes is an error, and an option whose working set cannot fit
the memory budget (`max_memory`) is a MethodError naming the option and the budget before
anything is allocated (RISE with a billion masks used to end in a raw RuntimeError)."""

from __future__ import annotations

import pytest
import torch
from helpers import SmallConvNet

import cnnscan
import cnnscan.batch
from cnnscan.cli import main
from cnnscan.errors import MethodError, TargetError
from cnnscan.models.preprocessing import Preprocessing
from cnnscan.report import run_scan

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def five_classes() -> cnnscan.Model:
    return cnnscan.load_model(
        SmallConvNet(classes=5), preprocessing=Preprocessing(size=(32, 32), resize_shorter=None)
    )


def test_top_k_above_the_classes_is_an_error(five_classes, tmp_path):
    with pytest.raises(TargetError, match="top_k must be a whole number from 1 to 5"):
        run_scan(five_classes, "sample:chelsea", methods=["gradient"], top_k=6)
    with pytest.raises(TargetError, match="from 1 to 5"):
        cnnscan.batch.run(["x.png"], "gradient", tmp_path / "out", model=five_classes, top_k=6)
    assert not (tmp_path / "out").exists()
    result = run_scan(
        five_classes, "sample:chelsea", methods=["gradient"], class_image_steps=0, evaluate="none"
    )
    assert len(result.predictions) == 5  # the default: 5, or every class of a smaller model


def test_cli_top_k_above_the_classes(capsys):
    assert main(["scan", "--top-k", "100000", "--methods", "gradient"]) == 1
    assert "top_k must be a whole number from 1 to 1000" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("method", "options", "option"),
    [
        ("rise", {"n_masks": 10**9}, "n_masks=1000000000"),
        ("integrated_gradients", {"n_steps": 10**6}, "n_steps=1000000"),
        ("integrated_gradients", {"n_steps": "auto", "max_steps": 10**6}, "max_steps=1000000"),
        ("smoothgrad", {"n_samples": 10**7}, "n_samples=10000000"),
        ("gradient_shap", {"n_samples": 10**9}, "n_samples=1000000000"),
        ("lime", {"n_samples": 10**8, "segments": 4}, "n_samples=100000000"),
        ("kernel_shap", {"n_samples": 10**8, "segments": 4}, "n_samples=100000000"),
    ],
)
def test_a_working_set_over_the_budget_names_the_option(method, options, option):
    message = rf"{option} needs .* GB of working memory, more than the budget of 2\.0 GB"
    with pytest.raises(MethodError, match=message):
        cnnscan.explain(SmallConvNet(), X, method, targets=[0], max_memory="2GB", **options)


def test_the_budget_is_the_users(five_classes):
    with pytest.raises(MethodError, match=r"n_masks=100000 needs 23 MB .* budget of 8 MB"):
        cnnscan.explain(five_classes, X, "rise", targets=[0], n_masks=100_000, max_memory="8MB")
    attr = cnnscan.explain(five_classes, X, "rise", targets=[0], n_masks=64, max_memory="8MB")
    assert torch.isfinite(attr.maps).all()
