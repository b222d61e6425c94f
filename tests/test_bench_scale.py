"""bench/scale.py's memory estimate, and its refusal to launch a cell that would not fit."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import torch

import bench.scale as scale
from bench.scale_worker import zipf_windows
from recloop.train.sharding.spec import bytes_per_row

GIB = 2**30


def test_peak_bytes_per_row_adds_the_transients_to_the_steady_state() -> None:
    dim = 64
    assert bytes_per_row(dim, sharded=False) == 1024  # weight, gradient, two moments
    assert scale.peak_bytes_per_row(dim, "replicated", 1) == 1024 + 2 * 256
    assert scale.peak_bytes_per_row(dim, "replicated", 2) == 1024 + 3 * 256  # + DDP bucket
    assert scale.peak_bytes_per_row(dim, "sharded", 2) == 260 + scale.SHARDED_MARGIN


def test_sharded_ranks_hold_their_share_of_the_rows_and_replicated_ranks_all() -> None:
    items = 10_000_000
    assert scale.rows_per_rank(items, "replicated", 2) == items + 1
    assert scale.rows_per_rank(items, "sharded", 2) == items // 2 + 1
    base = GIB // 2
    per_rank = scale.estimate_per_rank(items, "sharded", 2, base)
    assert per_rank == base + (items // 2 + 1) * (260 + scale.SHARDED_MARGIN)


@pytest.mark.parametrize(("mode", "procs"), [("replicated", 1), ("replicated", 2), ("sharded", 2)])
def test_largest_fitting_fits_and_a_tenth_more_does_not(mode: str, procs: int) -> None:
    base, budget = GIB // 2, 20 * GIB
    largest = scale.largest_fitting(mode, procs, base, budget)
    assert procs * scale.estimate_per_rank(largest, mode, procs, base) <= budget
    assert procs * scale.estimate_per_rank(int(largest * 1.1), mode, procs, base) > budget
    assert str(largest)[2:].strip("0") == ""  # two significant figures


def test_largest_fitting_is_zero_when_the_base_alone_does_not_fit() -> None:
    assert scale.largest_fitting("sharded", 2, 11 * GIB, 20 * GIB) == 0


def test_a_cell_that_does_not_fit_is_recorded_with_its_estimate_and_never_launched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*_: Any) -> dict[str, Any]:
        raise AssertionError("a cell that does not fit was launched")

    monkeypatch.setattr(scale, "launch", refuse)
    args = argparse.Namespace(steps=1, warmup=0, batch=128, negatives=8)
    cell = scale.run_cell(10_000_000, "replicated", 2, {}, 20 * GIB, args)
    assert cell["status"] == "does not fit"
    assert cell["estimate_gib_machine"] > 20
    assert cell["estimate_gib_per_rank"] == pytest.approx(
        cell["estimate_gib_machine"] / 2, abs=1e-3
    )


def test_parse_size() -> None:
    assert [scale.parse_size(s) for s in ("10k", "1M", "2.5M", "300")] == [
        10_000,
        1_000_000,
        2_500_000,
        300,
    ]
    with pytest.raises(SystemExit, match="not a size"):
        scale.parse_size("many")


def test_zipf_windows_are_valid_ids_with_a_popular_head_scattered_over_the_ids() -> None:
    items = 100_000
    ids = zipf_windows(torch.Generator().manual_seed(0), 400, 50, items)
    assert ids.shape == (400, 51)
    assert int(ids.min()) >= 1 and int(ids.max()) <= items
    counts = torch.bincount(ids.reshape(-1), minlength=items + 1)
    top = counts.topk(10).indices
    assert int(counts[top].sum()) > 0.1 * ids.numel()  # uniform would give 10 / 100,000
    assert int(top.max()) > items // 10  # the popular ids are not all at the start
