"""Issue 16, item 4: nonsense that used to run silently is an error naming the fix: a
non-bool for a bool option, a flag that names nothing, a class or method named twice (one
rule at every entry point: refused)."""

from __future__ import annotations

import pytest
import torch
from helpers import SmallConvNet

import cnnscan
import cnnscan.batch
from cnnscan.cli import main
from cnnscan.errors import MethodError, TargetError
from cnnscan.methods import get_method
from cnnscan.methods.options import check_options
from cnnscan.models.preprocessing import Preprocessing
from cnnscan.report import run_scan

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("occlusion", {"incremental": "maybe"}, "incremental must be True or False, got 'maybe'"),
        ("scorecam", {"align_corners": 1}, "align_corners must be True or False"),
        ("integrated_gradients", {"n_steps": "abc"}, "n_steps must be an integer or 'auto'"),
        ("rise", {"n_masks": 2.5}, "n_masks must be an integer"),
        ("lrp", {"epsilon": "small"}, "epsilon must be a number, got 'small'"),
    ],
)
def test_option_values_are_checked_against_the_signature(method, options, message):
    with pytest.raises(MethodError, match=message):
        cnnscan.explain(SmallConvNet(), X, method, targets=[0], **options)


def test_values_of_the_right_kind_pass():
    for method, options in [
        ("occlusion", {"incremental": False, "window": [8, 8], "fill": 0}),
        ("integrated_gradients", {"n_steps": "auto", "baseline": torch.zeros(1, 3, 32, 32)}),
        ("gradient", {"unit": ("conv1", 0, [1, 2])}),
        ("lrp", {"epsilon": 1, "rules": {"fc": "epsilon"}, "zero_params": None}),
        ("smoothgrad", {"seed": None, "noise_level": 0.1, "kind": "vargrad"}),
    ]:
        check_options(get_method(method), options)


def test_a_flag_that_names_nothing_is_an_error(capsys):
    for argv in (["scan", "--methods", ","], ["evaluate", "--metrics", " , "]):
        assert main(argv) == 1
        assert "names nothing" in capsys.readouterr().err


def test_a_class_named_twice_is_an_error(capsys, tmp_path):
    with pytest.raises(TargetError, match=r"class 2 .*named twice"):
        cnnscan.explain(SmallConvNet(), X, "gradient", targets=[2, 1, 2])
    argv = ["explain", "sample:chelsea", "--method", "gradient", "--out", str(tmp_path)]
    code = main([*argv, "--targets", "285,tiger cat,285"])
    assert code == 1
    assert "target class 285 (Egyptian cat) is named twice" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_method_named_twice_is_refused_everywhere(tmp_path):
    model = cnnscan.load_model(
        SmallConvNet(), preprocessing=Preprocessing(size=(32, 32), resize_shorter=None)
    )
    twice = ["gradient", "Gradient"]
    with pytest.raises(MethodError, match="named twice"):
        cnnscan.explain_many(model, X, twice)
    with pytest.raises(MethodError, match="named twice"):
        run_scan(model, "sample:chelsea", methods=twice, class_image_steps=0, evaluate="none")
    with pytest.raises(MethodError, match="named twice"):
        cnnscan.batch.run(["sample.png"], twice, tmp_path / "out", model=model, progress=False)
    with pytest.raises(MethodError, match="no methods"):
        run_scan(model, "sample:chelsea", methods=[], class_image_steps=0, evaluate="none")
    assert not (tmp_path / "out").exists()
