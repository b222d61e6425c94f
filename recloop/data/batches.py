"""Training batches for next-item prediction on every prefix (SASRec / HSTU style).

Each user's CSR sequence (see :mod:`recloop.data.sequences`) is cut into *windows* of up to
``L + 1`` consecutive events; a window's first ``L`` events are the input and its last ``L`` the
targets (shifted by one). Windows are laid out backwards from the end of the sequence, each new
window ending where the previous one's input started, so consecutive windows overlap by exactly
one event and every (non-empty prefix -> next item) pair is a target exactly once. A window
shorter than ``L + 1`` is left-padded with :data:`PADDING_ID` (0) in ids and timestamps.

Everything is vectorised numpy: the window index is two arrays (user, end position) built with
``np.repeat`` / ``np.cumsum``, and a batch is one fancy-indexing gather, so the source arrays
may be ``np.memmap`` (``np.load(..., mmap_mode="r")``) and are only read where a batch needs them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from recloop.data.sequences import PADDING_ID, Sequences
from recloop.errors import ConfigError

__all__ = [
    "ShardedBatchSampler",
    "TrainingWindows",
    "WindowConfig",
    "last_items",
    "make_loader",
]

Batch = dict[str, torch.Tensor]
_ScalarT = TypeVar("_ScalarT", bound=np.generic)


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


@dataclass(frozen=True)
class WindowConfig:
    """How sequences are cut into training windows.

    ``max_length`` is L, the model's context length (a window holds L + 1 events).
    ``max_windows_per_user`` keeps only each user's k most recent windows (None: all of them;
    1: the classic SASRec "last L + 1 items" per user).
    ``prefixes`` makes every prefix its own window, with a target at the last position only
    (the training of a non-causal model, which must not see an inner position's future); a
    user with n events then has n - 1 windows, and ``max_windows_per_user`` keeps the k most
    recent prefixes.
    """

    max_length: int
    max_windows_per_user: int | None = None
    prefixes: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.max_length) or self.max_length < 1:
            raise ConfigError(f"max_length must be an integer >= 1, got {self.max_length!r}")
        k = self.max_windows_per_user
        if k is not None and (not _is_int(k) or k < 1):
            raise ConfigError(f"max_windows_per_user must be None or an integer >= 1, got {k!r}")


def _gather_index(
    starts: npt.NDArray[np.int64], ends: npt.NDArray[np.int64], length: int, size: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Event index of the last ``length`` events of each row's range, and which are real.

    Padded slots point at the row's own start (clipped into ``[0, size)`` for an empty row at
    the very end), which keeps the gather local to the rows a batch touches.
    """
    idx = ends[:, None] - length + np.arange(length, dtype=np.int64)  # [N, length]
    valid = idx >= starts[:, None]  # [N, length]
    np.maximum(idx, starts[:, None], out=idx)
    np.minimum(idx, max(size - 1, 0), out=idx)
    return idx, valid


def _gather(
    values: npt.NDArray[_ScalarT], idx: npt.NDArray[np.int64], valid: npt.NDArray[np.bool_]
) -> npt.NDArray[_ScalarT]:
    if len(values) == 0:  # nothing to read: every slot is padding
        return np.zeros(idx.shape, dtype=values.dtype)
    out: npt.NDArray[_ScalarT] = np.asarray(values[idx])  # [N, length]; ndarray, not memmap
    out[~valid] = PADDING_ID
    return out


def last_items(
    values: npt.NDArray[_ScalarT],
    starts: npt.ArrayLike,
    ends: npt.ArrayLike,
    max_length: int,
) -> npt.NDArray[_ScalarT]:
    """For each row i, the last ``max_length`` entries of ``values[starts[i]:ends[i]]``.

    Left-padded with 0 to ``[N, max_length]``, same dtype as ``values``. Works for any per-event
    array (item ids, timestamps), in memory or memory-mapped; e.g. the serving context of every
    user is ``last_items(seq.items, seq.offsets[:-1], seq.offsets[1:], L)``.
    """
    if not _is_int(max_length) or max_length < 1:
        raise ConfigError(f"max_length must be an integer >= 1, got {max_length!r}")
    starts_a = np.asarray(starts, dtype=np.int64).reshape(-1)  # [N]
    ends_a = np.asarray(ends, dtype=np.int64).reshape(-1)  # [N]
    if starts_a.shape != ends_a.shape:
        raise ValueError(f"starts has {len(starts_a)} rows but ends has {len(ends_a)}")
    if len(starts_a) and (
        int(starts_a.min()) < 0
        or int(ends_a.max()) > len(values)
        or bool(np.any(starts_a > ends_a))
    ):
        raise IndexError(f"row ranges must satisfy 0 <= start <= end <= {len(values)}")
    idx, valid = _gather_index(starts_a, ends_a, int(max_length), len(values))
    return _gather(values, idx, valid)


class TrainingWindows(Dataset[Batch]):
    """Map-style dataset over training windows; one *item* is a whole batch.

    ``windows[indices]`` (a list / 1-D array of window indices) returns::

        input_ids          int64 [B, L]  item ids, left-padded with 0
        target_ids         int64 [B, L]  next item of each input position; 0 where the input
                                         is padding (no loss there), and with ``prefixes``
                                         everywhere but the last position
        timestamps         int64 [B, L]  timestamps of the input items, 0 at padding
        target_timestamps  int64 [B, L]  timestamps of the targets, 0 where target_ids is 0
        user_ids           int64 [B]     dense user id of each window

    Windows are ordered by user, then oldest first within a user (so index order follows the
    event arrays, which is friendly to memory-mapped inputs). Use it with
    ``DataLoader(windows, sampler=ShardedBatchSampler(...), batch_size=None)``; see
    :func:`make_loader`.
    """

    def __init__(self, sequences: Sequences, config: WindowConfig) -> None:
        self.sequences = sequences
        self.config = config
        length = config.max_length
        offsets = np.asarray(sequences.offsets, dtype=np.int64)  # [U + 1], small, in memory
        n = np.diff(offsets)  # [U]
        # A window ends `stride` events after the next older one: L (every prefix once, L
        # targets per window) or, with `prefixes`, 1 (one window per prefix, one target).
        stride = 1 if config.prefixes else length
        counts = np.where(n >= 2, (n - 2) // stride + 1, 0)  # [U] windows per user
        if config.max_windows_per_user is not None:
            np.minimum(counts, config.max_windows_per_user, out=counts)
        total = int(counts.sum())
        user = np.repeat(np.arange(len(n), dtype=np.int64), counts)  # [W]
        first = np.cumsum(counts) - counts  # [U] index of each user's first window
        rank = np.arange(total, dtype=np.int64) - first[user]  # [W] 0 = user's oldest kept
        back = counts[user] - 1 - rank  # [W] windows between this one and the sequence end
        end = offsets[user + 1] - back * stride  # [W] exclusive end of each window
        start = offsets[user]  # [W] the user's first event: a window never reaches past it
        for a in (user, start, end):
            a.flags.writeable = False
        self.window_users: npt.NDArray[np.int64] = user  # [W]
        self.window_starts: npt.NDArray[np.int64] = start  # [W]
        self.window_ends: npt.NDArray[np.int64] = end  # [W]

    def __len__(self) -> int:
        return len(self.window_ends)

    def batch(self, indices: npt.ArrayLike) -> Batch:
        """The batch made of the windows at ``indices`` (1-D, each in ``[0, len(self))``)."""
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)  # [B]
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
            raise IndexError(f"window indices must lie in [0, {len(self)})")
        length = self.config.max_length
        idx, valid = _gather_index(
            self.window_starts[rows], self.window_ends[rows], length + 1, self.sequences.num_events
        )
        items = _gather(self.sequences.items, idx, valid).astype(np.int64)  # [B, L + 1]
        times = _gather(self.sequences.timestamps, idx, valid).astype(np.int64)  # [B, L + 1]
        no_input = ~valid[:, :-1]  # [B, L] input is padding -> no target either
        if self.config.prefixes:
            no_input[:, :-1] = True  # the prefix's own target, at the last position, only
        target_ids = items[:, 1:].copy()  # [B, L]
        target_ts = times[:, 1:].copy()  # [B, L]
        target_ids[no_input] = PADDING_ID
        target_ts[no_input] = PADDING_ID
        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(items[:, :-1])),
            "target_ids": torch.from_numpy(target_ids),
            "timestamps": torch.from_numpy(np.ascontiguousarray(times[:, :-1])),
            "target_timestamps": torch.from_numpy(target_ts),
            "user_ids": torch.from_numpy(self.window_users[rows].copy()),
        }

    def __getitem__(self, indices: Sequence[int] | npt.NDArray[np.integer]) -> Batch:
        return self.batch(indices)


class ShardedBatchSampler(Sampler[list[int]]):
    """Global batches of window indices, sharded over data-parallel ranks.

    Each epoch draws one permutation of ``range(num_samples)`` seeded by ``(seed, epoch)`` (the
    identity when ``shuffle`` is False) and cuts it into global batches of ``global_batch_size``.
    Rank ``r`` of ``world_size`` yields the r-th contiguous slice of every global batch, so the
    ranks together see exactly the batches a single process would, and all ranks yield the same
    number of batches. A final short global batch is dropped with ``drop_last``; otherwise it is
    split as evenly as possible (``np.array_split``), which can leave a rank an empty batch when
    fewer windows than ranks remain: the training step must then contribute zero loss weight.
    Call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        lengths: npt.NDArray[np.integer] | None = None,
        bucket_batches: int = 64,
    ) -> None:
        super().__init__()
        if lengths is not None and len(lengths) != num_samples:
            raise ConfigError(f"lengths has {len(lengths)} entries for {num_samples} samples")
        if not _is_int(bucket_batches) or bucket_batches < 1:
            raise ConfigError(f"bucket_batches must be an integer >= 1, got {bucket_batches!r}")
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.bucket_batches = int(bucket_batches)
        for name, value, low in (
            ("num_samples", num_samples, 0),
            ("global_batch_size", global_batch_size, 1),
            ("world_size", world_size, 1),
            ("seed", seed, 0),
        ):
            if not _is_int(value) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if not _is_int(rank) or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
        if global_batch_size % world_size:
            raise ConfigError(
                f"global_batch_size ({global_batch_size}) must be divisible by "
                f"world_size ({world_size})"
            )
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    def set_epoch(self, epoch: int) -> None:
        if not _is_int(epoch) or epoch < 0:
            raise ConfigError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = rng.permutation(self.num_samples)  # [N]
        else:
            order = np.arange(self.num_samples, dtype=np.int64)  # [N]
        g, local = self.global_batch_size, self.local_batch_size
        full = self.num_samples // g
        if self.lengths is not None and self.shuffle and full:
            order = self._bucket(order, full, rng)
        shards = order[: full * g].reshape(full, self.world_size, local)[:, self.rank]  # [n, b]
        for shard in shards:
            yield shard.tolist()
        if full * g < self.num_samples and not self.drop_last:
            yield np.array_split(order[full * g :], self.world_size)[self.rank].tolist()

    def _bucket(
        self, order: npt.NDArray[np.int64], full: int, rng: np.random.Generator
    ) -> npt.NDArray[np.int64]:
        """Length bucketing: within each run of `bucket_batches` global batches of the shuffled
        order, sort windows by length, cut batches, then shuffle the batches. Batches then hold
        windows of similar length, so trimming their padding saves most of the work on short-
        sequence data, while every window is still seen once per epoch in a random batch."""
        lengths = self.lengths if self.lengths is not None else np.zeros(len(order), np.int64)
        g = self.global_batch_size
        head = order[: full * g].copy()
        span = g * self.bucket_batches
        for start in range(0, len(head), span):  # a few dozen slices per epoch
            chunk = head[start : start + span]
            head[start : start + span] = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches = head.reshape(full, g)[rng.permutation(full)]  # [n, g]
        return np.concatenate([batches.reshape(-1), order[full * g :]])


def make_loader(
    windows: TrainingWindows,
    global_batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    bucket_by_length: bool = False,
) -> DataLoader[Batch]:
    """A DataLoader yielding this rank's batches; ``loader.sampler.set_epoch(e)`` per epoch.

    Workers build whole batches (``batch_size=None``), so a batch is one vectorised gather.
    """
    sampler = ShardedBatchSampler(
        len(windows),
        global_batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        lengths=windows.window_ends - windows.window_starts if bucket_by_length else None,
    )
    return DataLoader(
        windows,
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        # Its own generator: creating an iterator draws a worker base seed, which must not
        # advance the global torch RNG (dropout, negatives), or a resumed run would diverge.
        generator=torch.Generator().manual_seed(seed),
    )


def trim_left_padding(batch: Batch) -> Batch:
    """Drops the leading columns that are padding in every row of ``input_ids``.

    recloop models count positions from the most recent item, so a narrower left-padded batch
    gives the same outputs for less work: short-sequence data (Amazon: median 6 of L=50) spends
    most of a full-width batch on padding.
    """
    real = batch["input_ids"] != PADDING_ID  # [B, L]
    columns = torch.nonzero(real.any(dim=0))
    first = int(columns[0]) if len(columns) else real.shape[1] - 1
    if first == 0:
        return batch
    return {k: v[:, first:] if v.dim() == 2 else v for k, v in batch.items()}
