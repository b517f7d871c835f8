"""Issue 16, item 1: a batch run refused because its output folder is in use by another
run touches nothing there (it used to remove the other run's OUT/.tmp on its way out)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import SmallConvNet
from PIL import Image

import cnnscan
import cnnscan.batch
from cnnscan.batch.store import Part, Store
from cnnscan.errors import BatchError
from cnnscan.models.preprocessing import Preprocessing


def test_a_refused_run_leaves_the_running_one_alone(tmp_path):
    image = tmp_path / "cat.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(image)
    out = tmp_path / "out"
    first = Store(out)  # the run in progress: it holds the folder, a part half written
    first.open({"methods": ["gradient"]})
    in_progress = first.tmp / "part-000000.npz"
    in_progress.write_bytes(b"half a part")
    settings = (out / "run.json").read_text()
    model = cnnscan.load_model(
        SmallConvNet(classes=5), preprocessing=Preprocessing(size=(32, 32), resize_shorter=None)
    )
    try:
        with pytest.raises(BatchError, match="in use by another batch run"):
            cnnscan.batch.run([image], ["gradient"], out, model=model, progress=False)
        assert in_progress.read_bytes() == b"half a part"
        assert (out / "run.json").read_text() == settings
        part = Part(0, [str(image)], arrays={"gradient": [np.zeros((1, 2, 2), np.float32)]})
        first.commit(part)  # the first run carries on
    finally:
        first.close()
    assert [number for number, _ in Store(out).manifest()] == [0]
