"""Issue 16, item 6: a batch run checks everything before it creates anything. Settings
that only fail on an image (a layer without spatial output, an option value the method
rejects, a working set over the memory budget, a top-K above the classes) used to fail
after the output folder and its run.json existed."""

from __future__ import annotations

import pytest
from helpers import FORWARDS, SafetyNet, SmallConvNet
from PIL import Image

import cnnscan
import cnnscan.batch
from cnnscan.cli import main
from cnnscan.errors import LayerError, MethodError, TargetError
from cnnscan.models.preprocessing import Preprocessing

TINY = Preprocessing(size=(32, 32), resize_shorter=None)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    (folder / "broken.png").write_text("not a picture")  # skipped by the rehearsal
    for name, colour in (("a.png", "red"), ("b.png", "teal")):
        Image.new("RGB", (40, 40), colour).save(folder / name)
    return folder


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"methods": ["gradcam"], "layer": "fc"}, LayerError, "spatial"),
        (
            {
                "methods": ["integrated_gradients"],
                "options": {"integrated_gradients": {"n_steps": 0}},
            },
            MethodError,
            "n_steps must be an integer >= 1",
        ),
        ({"methods": ["rise"], "options": {"rise": {"n_masks": 10**9}}}, MethodError, "budget"),
        ({"methods": ["gradient"], "targets": "top9"}, TargetError, "between 1 and 5"),
    ],
    ids=["layer", "option", "memory", "targets"],
)
def test_settings_that_fail_on_an_image_fail_before_the_folder_exists(
    images, tmp_path, settings, error, message
):
    model = cnnscan.load_model(SmallConvNet(classes=5), preprocessing=TINY)
    with pytest.raises(error, match=message):
        cnnscan.batch.run(images, out=tmp_path / "out", model=model, progress=False, **settings)
    assert not (tmp_path / "out").exists()


def test_cli_batch_leaves_no_folder_behind(images, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["batch", str(images), "--methods", "integrated_gradients", "--out", str(out)]
    code = main([*argv, "--option", "n_steps=abc"])
    assert code == 1
    assert "n_steps must be an integer or 'auto', got 'abc'" in capsys.readouterr().err
    assert not out.exists()


def test_the_rehearsal_stops_before_the_long_work(images, tmp_path):
    """RISE's 4000 masked forwards are not run to check its settings: the run makes one
    forward per image (and per layer table), not thousands more."""
    model = cnnscan.load_model(SafetyNet(), preprocessing=TINY)
    FORWARDS["count"] = 0
    with pytest.raises(LayerError):  # the rehearsal reaches the second method's bad layer
        cnnscan.batch.run(
            images, ["rise", "gradcam"], tmp_path / "out", model=model, layer="fc", progress=False
        )
    assert FORWARDS["count"] < 10
