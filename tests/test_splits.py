"""Splits, exact on a hand-made example."""

from __future__ import annotations

import numpy as np
import pytest

from recloop.data.sequences import Sequences
from recloop.data.splits import leave_one_out, time_split, time_split_by_fraction
from recloop.errors import DatasetError

# user 0: items 1 2 3 4 5 at t = 10 20 30 40 50
# user 1: items 6 7       at t = 15 45            (too short to evaluate with leave-one-out)
# user 2: items 8 9 1     at t = 5 35 60
SEQS = Sequences.from_lengths(
    np.array([5, 2, 3]),
    np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 1]),
    np.array([10, 20, 30, 40, 50, 15, 45, 5, 35, 60]),
)


def history(split_source: Sequences, starts: np.ndarray, ends: np.ndarray) -> list[list[int]]:
    return [split_source.items[s:e].tolist() for s, e in zip(starts, ends, strict=True)]


def test_leave_one_out_exact() -> None:
    split = leave_one_out(SEQS)
    assert split.train.offsets.tolist() == [0, 3, 5, 6]
    assert split.train.items.tolist() == [1, 2, 3, 6, 7, 8]
    assert split.train.timestamps.tolist() == [10, 20, 30, 15, 45, 5]
    assert split.valid.users.tolist() == [0, 2]
    assert split.valid.targets.tolist() == [4, 9]
    assert history(SEQS, split.valid.starts, split.valid.ends) == [[1, 2, 3], [8]]
    assert split.test.users.tolist() == [0, 2]
    assert split.test.targets.tolist() == [5, 1]
    assert history(SEQS, split.test.starts, split.test.ends) == [[1, 2, 3, 4], [8, 9]]


def test_leave_one_out_rejects_min_length_below_3() -> None:
    with pytest.raises(DatasetError, match="min_length >= 3"):
        leave_one_out(SEQS, min_length=2)


def test_time_split_all_targets() -> None:
    split = time_split(SEQS, valid_start=30, test_start=45)
    assert split.train.offsets.tolist() == [0, 2, 3, 4]
    assert split.train.items.tolist() == [1, 2, 6, 8]
    # validation: events with 30 <= t < 45: u0 item 3 (t30), u0 item 4 (t40), u2 item 9 (t35)
    assert split.valid.users.tolist() == [0, 0, 2]
    assert split.valid.targets.tolist() == [3, 4, 9]
    assert history(SEQS, split.valid.starts, split.valid.ends) == [[1, 2], [1, 2, 3], [8]]
    # test: t >= 45: u0 item 5, u1 item 7, u2 item 1; histories include validation events
    assert split.test.targets.tolist() == [5, 7, 1]
    assert history(SEQS, split.test.starts, split.test.ends) == [[1, 2, 3, 4], [6], [8, 9]]


def test_time_split_first_target_per_user() -> None:
    split = time_split(SEQS, valid_start=30, test_start=45, targets="first")
    assert split.valid.users.tolist() == [0, 2]
    assert split.valid.targets.tolist() == [3, 9]


def test_time_split_skips_targets_without_history() -> None:
    split = time_split(SEQS, valid_start=0, test_start=100)
    assert 1 not in split.valid.targets.tolist()[:1]  # user 0's first item has no history
    assert len(split.valid) == SEQS.num_events - SEQS.num_users


def test_time_split_by_fraction_cutoffs() -> None:
    split = time_split_by_fraction(SEQS, valid_fraction=0.2, test_fraction=0.2)
    assert split.test.targets.tolist() == [5, 1]  # t = 50, 60
    assert split.valid.targets.tolist() == [4, 7]  # t = 40, 45
    with pytest.raises(DatasetError, match="valid_fraction must be in"):
        time_split_by_fraction(SEQS, valid_fraction=1.5)
    with pytest.raises(DatasetError, match="test_start 1 is before valid_start 2"):
        time_split(SEQS, 2, 1)
