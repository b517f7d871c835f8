"""Scans run torch one thread per op with a lane beside them (`cnnscan.engine.threads`):
the lane's work is done once, its errors surface, torch's thread count comes back, and a
scan's maps are those of each method run alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import cnnscan
from cnnscan.engine.threads import SharedWork, beside, single_threaded
from cnnscan.report import run_scan


def test_single_threaded_restores_the_thread_count_also_on_errors():
    previous = torch.get_num_threads()
    with single_threaded():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == previous
    with pytest.raises(KeyError), single_threaded():
        raise KeyError("boom")
    assert torch.get_num_threads() == previous


def test_beside_runs_in_another_thread_while_the_block_runs():
    seen = []
    with single_threaded() as lane:
        started = threading.Event()

        def work():
            started.set()
            seen.append(threading.current_thread().name)

        with beside(lane, work):
            assert started.wait(10)  # the lane started before the block ended
    assert seen and seen[0] != threading.current_thread().name


def test_beside_raises_the_lanes_error_but_the_blocks_own_error_wins():
    def fail():
        raise ValueError("lane")

    with single_threaded() as lane:
        with pytest.raises(ValueError, match="lane"), beside(lane, fail):
            pass
        with pytest.raises(KeyError), beside(lane, fail):
            raise KeyError("block")


def test_shared_work_does_each_item_once_across_two_lanes():
    done, lock = [], threading.Lock()

    def do(item):
        time.sleep(0.002)
        with lock:
            done.append(item)

    work = SharedWork(range(40), do)
    with single_threaded() as lane, beside(lane, work.drain):
        work.drain()
    assert sorted(done) == list(range(40))


def test_shared_work_starts_no_item_after_a_failure():
    done = []

    def do(item):
        if item == 2:
            raise RuntimeError("item 2")
        done.append(item)

    work = SharedWork(range(10), do)
    with pytest.raises(RuntimeError, match="item 2"):
        work.drain()
    work.drain()  # the other lane, later: nothing more
    assert done == [0, 1]


@pytest.mark.slow
def test_a_scans_maps_equal_each_method_run_alone(default_model, chelsea):
    methods = ["gradcam", "integrated_gradients", "smoothgrad", "gradient_shap", "guided_backprop"]
    options = {"integrated_gradients": {"n_steps": 4}, "smoothgrad": {"n_samples": 3}}
    options["gradient_shap"] = {"n_samples": 3}
    result = run_scan(
        default_model,
        chelsea,
        methods=methods,
        top_k=2,
        options=options,
        class_image_steps=0,
        evaluate="none",
        concepts_top=0,
    )
    with single_threaded():
        for method in methods:
            alone = cnnscan.explain(
                default_model, chelsea, method, targets="top2", **options.get(method, {})
            )
            assert torch.equal(result.attributions[method].maps, alone.maps), method
