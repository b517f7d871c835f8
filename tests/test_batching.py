"""Batch sizes: the memory budget (`max_memory=`, `CNNSCAN_MEMORY_MB`) and the fixed sizes."""

from __future__ import annotations

import pytest
import torch
from helpers import SmallConvNet

import cnnscan
import cnnscan.engine.batch_size
import cnnscan.scan
from cnnscan.engine.batch_size import (
    PREFERRED,
    PREFERRED_SINGLE,
    fixed_batches,
    max_batch_for,
    memory_budget_bytes,
    parse_memory,
    preferred_batch,
)
from cnnscan.errors import MethodError

X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2048, 2048 * 2**20),
        ("512", 512 * 2**20),
        ("512MB", 512 * 2**20),
        ("512 MiB", 512 * 2**20),
        ("4GB", 4 * 2**30),
        ("1.5g", int(1.5 * 2**30)),
        ("64kb", 64 * 2**10),
    ],
)
def test_sizes_with_and_without_units(value, expected):
    assert parse_memory(value) == expected


@pytest.mark.parametrize("value", [0, -1, "", "lots", "4TB", "nan", "inf", "GB"])
def test_bad_sizes_are_refused(value):
    with pytest.raises(ValueError, match="positive size"):
        parse_memory(value)


def test_the_environment_sets_the_default_and_an_argument_overrides_it(monkeypatch):
    monkeypatch.delenv("CNNSCAN_MEMORY_MB", raising=False)
    assert memory_budget_bytes() == 2048 * 2**20
    monkeypatch.setenv("CNNSCAN_MEMORY_MB", "100")
    assert memory_budget_bytes() == 100 * 2**20
    assert memory_budget_bytes("1GB") == 2**30
    monkeypatch.setenv("CNNSCAN_MEMORY_MB", "a lot")
    with pytest.raises(ValueError, match="CNNSCAN_MEMORY_MB"):
        memory_budget_bytes()


def test_the_largest_batch_that_fits():
    assert max_batch_for(2**20, budget=10 * 2**20) == 10  # 10 MiB of 1 MiB items
    assert max_batch_for(2**20, ceiling=4, budget=10 * 2**20) == 4
    assert max_batch_for(2**30, budget=10 * 2**20) == 1  # never below one
    assert max_batch_for(0, ceiling=7) == 7


def sizes(slices) -> list[int]:
    return [s.stop - s.start for s in slices]


def test_fixed_batches_cover_the_range_in_order_at_a_size_that_depends_on_the_work_only():
    slices = list(fixed_batches(37, limit=64))
    assert [i for s in slices for i in range(s.start, s.stop)] == list(range(37))
    assert sizes(slices) == [preferred_batch()] * (37 // preferred_batch()) + (
        [37 % preferred_batch()] if 37 % preferred_batch() else []
    )
    assert sizes(fixed_batches(10, limit=8, size=3)) == [3, 3, 3, 1]  # a chosen size
    assert sizes(fixed_batches(5, limit=2, size=3)) == [2, 2, 1]  # cut to the memory budget
    assert sizes(fixed_batches(3, limit=1)) == [1, 1, 1]


def test_the_preferred_batch_follows_torchs_thread_count():
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert preferred_batch() == PREFERRED_SINGLE == 1
        torch.set_num_threads(2)
        assert preferred_batch() == PREFERRED == 4
    finally:
        torch.set_num_threads(previous)


def test_max_memory_limits_the_batches_of_a_method(monkeypatch):
    limits = []
    real = cnnscan.scan.fixed_batches

    def spy(total, limit, size=None):
        limits.append(limit)
        return real(total, limit, size)

    monkeypatch.setattr(cnnscan.scan, "fixed_batches", spy)
    net = SmallConvNet().eval()
    options = {"n_masks": 40, "cell": 4, "seed": 0}
    roomy = cnnscan.explain(net, X, "rise", targets=[1], max_memory="1GB", **options)
    assert max(limits) > 1
    limits.clear()
    tight = cnnscan.explain(net, X, "rise", targets=[1], max_memory="8kb", **options)
    assert limits and max(limits) == 1  # one masked copy at a time...
    torch.testing.assert_close(tight.maps, roomy.maps)  # ...and the same answer


def test_bad_max_memory_is_a_clear_error_before_any_work():
    with pytest.raises(MethodError, match="max_memory"):
        cnnscan.explain(SmallConvNet().eval(), X, "gradient", max_memory="lots")


def test_derived_scans_keep_the_budget():
    from cnnscan.scan import make_scan

    scan = make_scan(SmallConvNet().eval(), X, max_memory="3MB")
    assert scan.memory_budget == 3 * 2**20
    assert scan.derive(X + 1).memory_budget == 3 * 2**20


def test_the_command_line_takes_max_memory(capsys, tmp_path):
    from cnnscan.cli import main

    argv = ["explain", "sample:chelsea", "--method", "gradient", "--out", str(tmp_path)]
    assert main([*argv, "--max-memory", "lots"]) == 1
    assert "max_memory" in capsys.readouterr().err
    assert main([*argv, "--max-memory", "256MB"]) == 0
