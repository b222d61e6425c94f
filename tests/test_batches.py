from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from recloop.data.batches import (
    ShardedBatchSampler,
    TrainingWindows,
    WindowConfig,
    last_items,
    make_loader,
)
from recloop.data.sequences import Sequences
from recloop.errors import ConfigError

KEYS = ("input_ids", "target_ids", "timestamps", "target_timestamps", "user_ids")


def hand_sequences() -> Sequences:
    # user 0: 7 items, user 1: 2 items, user 2: 1 item, user 3: none, user 4: 8 items.
    # Timestamps are 10 x the item id so both can be checked at once.
    items = [*(1, 2, 3, 4, 5, 6, 7), *(20, 21), 25, *(31, 32, 33, 34, 35, 36, 37, 38)]
    return Sequences.from_lengths(
        np.array([7, 2, 1, 0, 8]), np.array(items), 10 * np.array(items, dtype=np.int64)
    )


def random_sequences(
    seed: int, num_users: int = 60, max_len: int = 40, empty_last: bool = True
) -> Sequences:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len, size=num_users)
    if empty_last:
        lengths[-1] = 0
    total = int(lengths.sum())
    # Item id = global event position + 1: every event is identifiable from its id.
    items = np.arange(1, total + 1)
    times = np.arange(total, dtype=np.int64) * 7 + 3
    return Sequences.from_lengths(lengths, items, times)


def as_numpy(batch: dict[str, torch.Tensor]) -> dict[str, npt.NDArray[np.int64]]:
    assert set(batch) == set(KEYS)
    for value in batch.values():
        assert value.dtype == torch.int64
    return {k: v.numpy() for k, v in batch.items()}


def all_windows(windows: TrainingWindows) -> dict[str, npt.NDArray[np.int64]]:
    return as_numpy(windows[np.arange(len(windows))])


def test_hand_example_windows_and_padding() -> None:
    windows = TrainingWindows(hand_sequences(), WindowConfig(max_length=3))
    # user 0 (7 items, L=3): windows end at 7 and 4 -> events [3, 7) and [0, 4), overlap 1.
    # user 1 (2 items): one left-padded window. users 2 (1 item) and 3 (empty): none.
    # user 4 (8 items): windows end at 8, 5, 2 -> [4, 8), [1, 5), [0, 2) (padded).
    # Order: by user, oldest window first.
    assert len(windows) == 6
    batch = all_windows(windows)
    np.testing.assert_array_equal(batch["user_ids"], [0, 0, 1, 4, 4, 4])
    expected_inputs = [
        [1, 2, 3],
        [4, 5, 6],
        [0, 0, 20],
        [0, 0, 31],
        [32, 33, 34],
        [35, 36, 37],
    ]
    expected_targets = [
        [2, 3, 4],
        [5, 6, 7],
        [0, 0, 21],
        [0, 0, 32],
        [33, 34, 35],
        [36, 37, 38],
    ]
    np.testing.assert_array_equal(batch["input_ids"], expected_inputs)
    np.testing.assert_array_equal(batch["target_ids"], expected_targets)
    np.testing.assert_array_equal(batch["timestamps"], 10 * np.array(expected_inputs))
    np.testing.assert_array_equal(batch["target_timestamps"], 10 * np.array(expected_targets))


def test_any_index_order_and_single_window() -> None:
    windows = TrainingWindows(hand_sequences(), WindowConfig(max_length=3))
    full = all_windows(windows)
    picked = as_numpy(windows[[5, 2, 2]])
    for key in KEYS:
        np.testing.assert_array_equal(picked[key], full[key][[5, 2, 2]])
    one = as_numpy(windows.batch(np.array([3])))
    np.testing.assert_array_equal(one["input_ids"], [[0, 0, 31]])
    empty = as_numpy(windows[[]])
    assert empty["input_ids"].shape == (0, 3) and empty["user_ids"].shape == (0,)


def test_long_context_pads_every_user() -> None:
    windows = TrainingWindows(hand_sequences(), WindowConfig(max_length=8))
    batch = all_windows(windows)
    np.testing.assert_array_equal(batch["user_ids"], [0, 1, 4])
    np.testing.assert_array_equal(
        batch["input_ids"],
        [
            [0, 0, 1, 2, 3, 4, 5, 6],
            [0, 0, 0, 0, 0, 0, 0, 20],
            [0, 31, 32, 33, 34, 35, 36, 37],
        ],
    )
    np.testing.assert_array_equal(
        batch["target_ids"],
        [
            [0, 0, 2, 3, 4, 5, 6, 7],
            [0, 0, 0, 0, 0, 0, 0, 21],
            [0, 32, 33, 34, 35, 36, 37, 38],
        ],
    )


@pytest.mark.parametrize("length", [1, 2, 3, 5, 16, 64])
def test_every_prefix_target_exactly_once(length: int) -> None:
    seqs = random_sequences(seed=length)
    windows = TrainingWindows(seqs, WindowConfig(max_length=length))
    batch = all_windows(windows)
    inputs, targets = batch["input_ids"], batch["target_ids"]
    # Event ids are global positions + 1; targets must be exactly every event but users' first.
    first_events = seqs.offsets[:-1][seqs.lengths > 0] + 1
    expected = np.setdiff1d(np.arange(1, seqs.num_events + 1), first_events)
    got = targets[targets != 0]
    assert len(got) == len(expected)
    np.testing.assert_array_equal(np.sort(got), expected)
    # Each target follows its input, and the input history is that user's preceding events.
    has_target = targets != 0
    np.testing.assert_array_equal(has_target, inputs != 0)
    np.testing.assert_array_equal(inputs[has_target], targets[has_target] - 1)
    user_of_event = np.concatenate([[-1], seqs.user_of_event()])
    np.testing.assert_array_equal(
        user_of_event[targets[has_target]],
        np.broadcast_to(batch["user_ids"][:, None], targets.shape)[has_target],
    )
    # Padding is left only; timestamps follow the ids.
    assert np.all(np.diff(has_target.astype(np.int8), axis=1) >= 0)
    times = np.concatenate([[0], seqs.timestamps])
    np.testing.assert_array_equal(batch["timestamps"], times[inputs])
    np.testing.assert_array_equal(batch["target_timestamps"], times[targets])


def test_max_windows_per_user_one_is_last_items() -> None:
    seqs = random_sequences(seed=1, max_len=30)
    length = 6
    windows = TrainingWindows(seqs, WindowConfig(max_length=length, max_windows_per_user=1))
    users = np.flatnonzero(seqs.lengths >= 2)
    batch = all_windows(windows)
    np.testing.assert_array_equal(batch["user_ids"], users)
    last = last_items(seqs.items, seqs.offsets[users], seqs.offsets[users + 1], length + 1)
    np.testing.assert_array_equal(batch["input_ids"], last[:, :-1])
    targets = last[:, 1:].copy()
    targets[last[:, :-1] == 0] = 0
    np.testing.assert_array_equal(batch["target_ids"], targets)


def test_max_windows_per_user_keeps_most_recent() -> None:
    seqs = hand_sequences()
    every = all_windows(TrainingWindows(seqs, WindowConfig(max_length=3)))
    two = all_windows(TrainingWindows(seqs, WindowConfig(max_length=3, max_windows_per_user=2)))
    keep = [0, 1, 2, 4, 5]  # user 4 loses its oldest window
    for key in KEYS:
        np.testing.assert_array_equal(two[key], every[key][keep])


def test_last_items_exact() -> None:
    values = np.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=np.int32)
    starts = np.array([0, 2, 5, 5, 8, 7])
    ends = np.array([2, 7, 5, 8, 8, 8])
    out = last_items(values, starts, ends, 3)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(
        out,
        [
            [0, 1, 2],
            [5, 6, 7],
            [0, 0, 0],
            [6, 7, 8],
            [0, 0, 0],
            [0, 0, 8],
        ],
    )
    times = np.arange(8, dtype=np.int64) * 100
    stamps = last_items(times, starts, ends, 2)
    assert stamps.dtype == np.int64
    np.testing.assert_array_equal(
        stamps, [[0, 100], [500, 600], [0, 0], [600, 700], [0, 0], [0, 700]]
    )
    assert last_items(values, np.array([], dtype=np.int64), np.array([]), 4).shape == (0, 4)
    assert last_items(np.zeros(0, dtype=np.int32), [0, 0], [0, 0], 2).tolist() == [[0, 0]] * 2


def test_last_items_rejects_bad_ranges() -> None:
    values = np.arange(1, 6)
    with pytest.raises(IndexError):
        last_items(values, [0], [6], 2)
    with pytest.raises(IndexError):
        last_items(values, [3], [2], 2)
    with pytest.raises(ValueError, match="rows"):
        last_items(values, [0, 1], [2], 2)
    with pytest.raises(ConfigError, match="max_length"):
        last_items(values, [0], [2], 0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_length": 0}, "max_length"),
        ({"max_length": True}, "max_length"),
        ({"max_length": 2.0}, "max_length"),
        ({"max_length": 4, "max_windows_per_user": 0}, "max_windows_per_user"),
        ({"max_length": 4, "max_windows_per_user": -1}, "max_windows_per_user"),
    ],
)
def test_window_config_errors(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        WindowConfig(**kwargs)  # type: ignore[arg-type]


def test_batch_rejects_out_of_range_indices() -> None:
    windows = TrainingWindows(hand_sequences(), WindowConfig(max_length=3))
    with pytest.raises(IndexError):
        windows[[0, 6]]
    with pytest.raises(IndexError):
        windows[[-1]]


def test_no_windows_at_all() -> None:
    seqs = Sequences.from_lengths(np.array([1, 0, 1]), np.array([4, 5]), np.array([1, 2]))
    windows = TrainingWindows(seqs, WindowConfig(max_length=4))
    assert len(windows) == 0
    assert list(make_loader(windows, 4)) == []


def batches_of(sampler: ShardedBatchSampler) -> list[list[int]]:
    return list(sampler)


def flat(batches: Iterable[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(batches))


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_ranks_together_equal_single_process(drop_last: bool) -> None:
    n, global_batch = 103, 12
    single = ShardedBatchSampler(n, global_batch, seed=5, drop_last=drop_last)
    single.set_epoch(3)
    reference = batches_of(single)
    for world in (2, 3, 4):
        shards = []
        for rank in range(world):
            sampler = ShardedBatchSampler(
                n, global_batch, rank=rank, world_size=world, seed=5, drop_last=drop_last
            )
            sampler.set_epoch(3)
            shards.append(batches_of(sampler))
            assert len(shards[-1]) == len(sampler) == len(single)
            assert all(len(b) == global_batch // world for b in shards[-1][: n // global_batch])
        combined = [flat(parts) for parts in zip(*shards, strict=True)]
        assert combined == reference


def test_sampler_epochs_seeds_and_coverage() -> None:
    sampler = ShardedBatchSampler(50, 8, seed=1)
    epoch0 = batches_of(sampler)
    assert batches_of(sampler) == epoch0  # same epoch, same order
    assert sorted(flat(epoch0)) == list(range(50))  # a permutation: each window once
    sampler.set_epoch(1)
    epoch1 = batches_of(sampler)
    assert epoch1 != epoch0 and sorted(flat(epoch1)) == list(range(50))
    other_seed = ShardedBatchSampler(50, 8, seed=2)
    assert batches_of(other_seed) != epoch0
    ordered = ShardedBatchSampler(10, 4, shuffle=False)
    ordered.set_epoch(7)
    assert batches_of(ordered) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_sampler_drop_last_and_short_last_batch() -> None:
    keep = ShardedBatchSampler(10, 4, shuffle=False)
    drop = ShardedBatchSampler(10, 4, shuffle=False, drop_last=True)
    assert len(keep) == 3 and len(drop) == 2
    assert batches_of(drop) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # A short last global batch is split as evenly as possible; every rank still yields it.
    ranks = [ShardedBatchSampler(9, 4, rank=r, world_size=4, shuffle=False) for r in range(4)]
    assert [batches_of(s)[-1] for s in ranks] == [[8], [], [], []]
    assert [len(batches_of(s)) for s in ranks] == [3, 3, 3, 3]
    assert len(ShardedBatchSampler(8, 4, drop_last=True)) == 2
    assert len(ShardedBatchSampler(0, 4)) == 0 and batches_of(ShardedBatchSampler(0, 4)) == []


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        ((10, 6), {"world_size": 4}, "divisible"),
        ((10, 0), {}, "global_batch_size"),
        ((10, 4), {"world_size": 0}, "world_size"),
        ((10, 4), {"rank": 2, "world_size": 2}, "rank"),
        ((10, 4), {"rank": -1}, "rank"),
        ((-1, 4), {}, "num_samples"),
        ((10, 4), {"seed": -3}, "seed"),
    ],
)
def test_sampler_config_errors(args: tuple[int, int], kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        ShardedBatchSampler(*args, **kwargs)


def test_sampler_rejects_negative_epoch() -> None:
    with pytest.raises(ConfigError, match="epoch"):
        ShardedBatchSampler(10, 4).set_epoch(-1)


def collect(
    loader: torch.utils.data.DataLoader[dict[str, torch.Tensor]],
) -> list[dict[str, np.ndarray]]:
    return [as_numpy(batch) for batch in loader]


def assert_same_batches(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in KEYS:
            np.testing.assert_array_equal(x[key], y[key])


def test_loader_workers_match_main_process() -> None:
    windows = TrainingWindows(random_sequences(seed=3, num_users=80), WindowConfig(max_length=5))
    serial = make_loader(windows, 16, seed=9)
    parallel = make_loader(windows, 16, seed=9, num_workers=2)
    for epoch in (0, 1):
        serial.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        parallel.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        expected = collect(serial)
        assert len(expected) == len(serial) == -(-len(windows) // 16)
        assert_same_batches(collect(parallel), expected)
    del parallel


def test_loader_rank_shards_cover_global_batches() -> None:
    windows = TrainingWindows(random_sequences(seed=4), WindowConfig(max_length=4))
    whole = collect(make_loader(windows, 8, seed=2, drop_last=True))
    halves = [
        collect(make_loader(windows, 8, seed=2, rank=r, world_size=2, drop_last=True))
        for r in (0, 1)
    ]
    for full, first, second in zip(whole, *halves, strict=True):
        for key in KEYS:
            np.testing.assert_array_equal(full[key], np.concatenate([first[key], second[key]]))


def test_memmap_inputs(tmp_path: Path) -> None:
    seqs = random_sequences(seed=7)
    for name in ("offsets", "items", "timestamps"):
        np.save(tmp_path / f"{name}.npy", getattr(seqs, name))
    mapped = Sequences(
        offsets=np.load(tmp_path / "offsets.npy", mmap_mode="r"),
        items=np.load(tmp_path / "items.npy", mmap_mode="r"),
        timestamps=np.load(tmp_path / "timestamps.npy", mmap_mode="r"),
    )
    assert isinstance(mapped.items, np.memmap)
    config = WindowConfig(max_length=6, max_windows_per_user=3)
    in_memory = TrainingWindows(seqs, config)
    on_disk = TrainingWindows(mapped, config)
    assert len(on_disk) == len(in_memory)
    rows = np.random.default_rng(0).permutation(len(in_memory))[:40]
    assert_same_batches([as_numpy(on_disk[rows])], [as_numpy(in_memory[rows])])
    for value in on_disk[rows].values():
        value.add_(1)  # tensors are writable copies, never views of the read-only map
    assert_same_batches(
        collect(make_loader(on_disk, 32, num_workers=2)), collect(make_loader(in_memory, 32))
    )
    np.testing.assert_array_equal(
        last_items(mapped.items, mapped.offsets[:-1], mapped.offsets[1:], 5),
        last_items(seqs.items, seqs.offsets[:-1], seqs.offsets[1:], 5),
    )


def test_length_bucketing_keeps_every_window_once_and_groups_lengths() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 51, size=1000)
    plain = ShardedBatchSampler(1000, 50, seed=3)
    bucketed = ShardedBatchSampler(1000, 50, seed=3, lengths=lengths, bucket_batches=5)
    batches = list(bucketed)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 0.5 * np.mean([np.ptp(lengths[b]) for b in plain])
    bucketed.set_epoch(1)
    assert list(bucketed) != batches  # still reshuffled every epoch
    shards = [
        list(ShardedBatchSampler(1000, 50, seed=3, lengths=lengths, bucket_batches=5, rank=r,
                                 world_size=2))
        for r in range(2)
    ]  # fmt: skip
    assert [a + b for a, b in zip(*shards, strict=True)] == batches


def test_length_bucketing_rejects_wrong_lengths() -> None:
    with pytest.raises(ConfigError, match="lengths has 3 entries for 4 samples"):
        ShardedBatchSampler(4, 2, lengths=np.array([1, 2, 3]))


def test_pad_to_width_left_pads_to_the_next_allowed_width() -> None:
    from bench.train_speed import pad_to_width  # only the benchmark compiles (train.compile went)

    batch = {
        "input_ids": torch.tensor([[0, 3, 4], [5, 6, 7]]),
        "target_ids": torch.tensor([[0, 4, 9], [6, 7, 8]]),
        "user_ids": torch.tensor([1, 2]),
    }
    padded = pad_to_width(batch, widths=(2, 5, 8))
    assert padded["input_ids"].tolist() == [[0, 0, 0, 3, 4], [0, 0, 5, 6, 7]]
    assert padded["target_ids"].tolist() == [[0, 0, 0, 4, 9], [0, 0, 6, 7, 8]]
    assert padded["user_ids"].tolist() == [1, 2]
    assert pad_to_width(batch, widths=(2,)) is batch  # wider than every width: unchanged


@pytest.mark.parametrize("length", [1, 3, 16])
def test_prefix_windows_hold_each_prefix_once_with_its_target_last(length: int) -> None:
    # samples = "prefixes" (non-causal models): one window per prefix, the whole preceding
    # history (up to L items) as input and the prefix's next item as the only target.
    seqs = random_sequences(seed=length)
    windows = TrainingWindows(seqs, WindowConfig(max_length=length, prefixes=True))
    batch = all_windows(windows)
    inputs, targets = batch["input_ids"], batch["target_ids"]
    assert (targets[:, :-1] == 0).all()
    first_events = seqs.offsets[:-1][seqs.lengths > 0] + 1
    expected = np.setdiff1d(np.arange(1, seqs.num_events + 1), first_events)
    assert len(windows) == len(expected)
    np.testing.assert_array_equal(np.sort(targets[:, -1]), expected)
    for row in range(len(windows)):
        target = int(targets[row, -1])  # event ids are global positions + 1
        user = int(batch["user_ids"][row])
        start = int(seqs.offsets[user])
        history = np.arange(max(start, target - 1 - length), target - 1) + 1
        np.testing.assert_array_equal(inputs[row, length - len(history) :], history)
        assert (inputs[row, : length - len(history)] == 0).all()
    times = np.concatenate([[0], seqs.timestamps])
    np.testing.assert_array_equal(batch["timestamps"], times[inputs])
    np.testing.assert_array_equal(batch["target_timestamps"], times[targets])


def test_prefix_windows_per_user_keeps_the_most_recent_prefixes() -> None:
    seqs = hand_sequences()
    every = all_windows(TrainingWindows(seqs, WindowConfig(max_length=3, prefixes=True)))
    # user 0: 6 prefixes, user 1: 1, user 4: 7; keep the last two of each
    assert len(every["user_ids"]) == 14
    two = all_windows(
        TrainingWindows(seqs, WindowConfig(max_length=3, max_windows_per_user=2, prefixes=True))
    )
    np.testing.assert_array_equal(two["user_ids"], [0, 0, 1, 4, 4])
    np.testing.assert_array_equal(two["target_ids"][:, -1], [6, 7, 21, 37, 38])
    np.testing.assert_array_equal(two["input_ids"][-1], [35, 36, 37])
    np.testing.assert_array_equal(two["input_ids"][2], [0, 0, 20])
