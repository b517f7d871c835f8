"""Two web sessions at once on the one shared model: each gets the results it would get
alone, and the model is left exactly as it was.

The sessions are two threads calling what the page calls (a `Workspace` each, background
synthesis jobs), started together on a freshly loaded model, so that their first forwards,
hooks and fx traces of the shared working copy overlap. The reference is each session run
alone afterwards."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import DOMESTIC_CATS

import cnnscan
from cnnscan.app import core, jobs, sources

PLAN = [
    core.Column("gradcam"),
    core.Column("guided_backprop"),
    core.Column("ablationcam", "_blocks.0"),  # traces the model to split it at the layer
    core.Column("scorecam", "_blocks.0"),  # traces it to fold its BatchNorms
    core.Column("lrp"),
]
DREAM = jobs.SynthesisRequest("deepdream", steps=2, octaves=1, layer="_blocks.4")


def session(model: cnnscan.Model, picture: sources.SourceImage, start: threading.Barrier) -> dict:
    """What one page session computes: top-5, a grid of top-2 cells, feature maps, a dream."""
    ws = core.Workspace(model, "default", picture, core.ResultCache())
    start.wait(timeout=120)
    out = {"top5": [row["class_id"] for row in ws.predictions(5)]}
    targets = ws.top_classes(2)
    out["targets"] = targets
    out["cells"] = {c.title: [a.maps for a in ws.explain(c, targets)] for c in PLAN}
    out["features"] = ws.feature_maps("_blocks.5._swish@0").clone()
    job = jobs.Job(model, picture, DREAM, core.ResultCache(), ("dream",))
    assert job.wait(600) == "done", job.error
    out["dream"] = job.result.pixels
    return out


def _hooks(module: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in module.modules()
    )


@pytest.mark.slow
def test_two_sessions_at_once_get_their_own_results():
    model = cnnscan.load_model()  # fresh: nothing traced or cached for it yet
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    pictures = [sources.sample_picture("chelsea"), sources.sample_picture("coffee")]
    start = threading.Barrier(2)
    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(session, model, picture, start) for picture in pictures]
        together = [future.result(timeout=1200) for future in running]
    alone = [session(model, picture, threading.Barrier(1)) for picture in pictures]

    assert together[0]["top5"][0] in DOMESTIC_CATS and together[1]["top5"][0] == 967  # separate
    for both, single in zip(together, alone, strict=True):
        assert both["top5"] == single["top5"]
        assert both["targets"] == single["targets"]
        for title, maps in single["cells"].items():
            for got, expected in zip(both["cells"][title], maps, strict=True):
                scale = float(expected.abs().max())
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(both["features"], single["features"], rtol=0, atol=0)
        torch.testing.assert_close(both["dream"], single["dream"], rtol=1e-4, atol=1e-5)
    cat, cup = together
    for title in cat["cells"]:
        assert not torch.allclose(cat["cells"][title][0], cup["cells"][title][0])

    # the shared model itself: same weights, no hooks, still in eval mode with its flags
    assert _hooks(model.module) == 0
    assert not model.module.training
    after = model.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
