"""Train / validation / test splits over CSR sequences, without copying histories.

An evaluation example is (user, history = items[start:end], target): histories are views into
the dataset's own arrays, so a split of 1M users costs a few arrays of 8 bytes per example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from recloop.data.sequences import Sequences
from recloop.errors import DatasetError


@dataclass(frozen=True)
class EvalExamples:
    users: npt.NDArray[np.int64]  # [N] dense user ids
    starts: npt.NDArray[np.int64]  # [N] history = items[starts:ends] of the full sequences
    ends: npt.NDArray[np.int64]  # [N]
    targets: npt.NDArray[np.int32]  # [N] item to predict (items[ends])

    def __len__(self) -> int:
        return len(self.users)


@dataclass(frozen=True)
class Split:
    train: Sequences  # per-user training sequences (every user, possibly empty)
    valid: EvalExamples
    test: EvalExamples
    source: Sequences  # the full sequences the examples' starts/ends index into


def leave_one_out(sequences: Sequences, min_length: int = 3) -> Split:
    """Last item = test, second-to-last = validation, the rest = training.

    Users with fewer than `min_length` (>= 3) events keep all of them for training and give
    no evaluation example (the SASRec convention).
    """
    if min_length < 3:
        raise DatasetError(f"leave_one_out needs min_length >= 3, got {min_length}")
    offsets = np.asarray(sequences.offsets)
    lengths = np.diff(offsets)  # [U]
    evaluated = lengths >= min_length
    train_lengths = np.where(evaluated, lengths - 2, lengths)  # [U]
    train = _prefixes(sequences, train_lengths)
    users = np.flatnonzero(evaluated).astype(np.int64)
    starts = offsets[users]
    test_ends = offsets[users + 1] - 1
    valid_ends = test_ends - 1
    items = np.asarray(sequences.items)
    valid = EvalExamples(users, starts, valid_ends, items[valid_ends])
    test = EvalExamples(users, starts, test_ends, items[test_ends])
    return Split(train=train, valid=valid, test=test, source=sequences)


def time_split(
    sequences: Sequences,
    valid_start: int,
    test_start: int,
    targets: Literal["all", "first"] = "all",
) -> Split:
    """Global temporal split: train on events before `valid_start`; events in
    [valid_start, test_start) are validation targets and events at or after `test_start` are
    test targets, each predicted from all of the user's earlier events. `targets="first"` keeps
    only each user's first target in each period. Targets without any history are skipped.
    """
    if test_start < valid_start:
        raise DatasetError(f"test_start {test_start} is before valid_start {valid_start}")
    if targets not in ("all", "first"):
        raise DatasetError(f"targets must be 'all' or 'first', got {targets!r}")
    offsets = np.asarray(sequences.offsets)
    timestamps = np.asarray(sequences.timestamps)
    user = sequences.user_of_event()  # [E]
    starts = offsets[user]  # [E]
    position = np.arange(len(timestamps), dtype=np.int64)
    in_train = timestamps < valid_start
    train_lengths = np.bincount(user[in_train], minlength=sequences.num_users)
    train = _prefixes(sequences, train_lengths)
    has_history = position > starts
    items = np.asarray(sequences.items)

    def period(mask: npt.NDArray[np.bool_]) -> EvalExamples:
        chosen = np.flatnonzero(mask & has_history)
        if targets == "first" and len(chosen):
            first = np.ones(len(chosen), dtype=bool)
            first[1:] = user[chosen[1:]] != user[chosen[:-1]]
            chosen = chosen[first]
        return EvalExamples(user[chosen], starts[chosen], chosen.astype(np.int64), items[chosen])

    valid = period((timestamps >= valid_start) & (timestamps < test_start))
    test = period(timestamps >= test_start)
    return Split(train=train, valid=valid, test=test, source=sequences)


def time_split_by_fraction(
    sequences: Sequences,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    targets: Literal["all", "first"] = "all",
) -> Split:
    """`time_split` with cut-offs at the quantiles that leave the given fractions of events."""
    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise DatasetError(f"{name} must be in [0, 1), got {value}")
    if valid_fraction + test_fraction >= 1.0:
        raise DatasetError("valid_fraction + test_fraction must be below 1")
    timestamps = np.asarray(sequences.timestamps)
    test_start = int(np.quantile(timestamps, 1.0 - test_fraction, method="higher"))
    valid_quantile = 1.0 - test_fraction - valid_fraction
    valid_start = int(np.quantile(timestamps, valid_quantile, method="higher"))
    return time_split(sequences, valid_start, test_start, targets)


def _prefixes(sequences: Sequences, keep: npt.NDArray[np.integer]) -> Sequences:
    """The first keep[u] events of every user u, as new CSR arrays."""
    offsets = np.asarray(sequences.offsets)
    user = sequences.user_of_event()  # [E]
    position = np.arange(len(user), dtype=np.int64) - offsets[user]  # [E]
    mask = position < np.asarray(keep)[user]
    return Sequences.from_lengths(
        np.asarray(keep, dtype=np.int64),
        np.asarray(sequences.items)[mask],
        np.asarray(sequences.timestamps)[mask],
    )
