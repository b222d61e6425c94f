"""The sharded item index: contiguous id ranges, one index each, searched concurrently."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

from recloop.errors import ServingError
from recloop.serve.indexes.base import (
    FloatArray,
    IdArray,
    ItemIndex,
    check_table,
    finish,
    positive_int,
    top_k,
)


def split_table(table: npt.ArrayLike, shards: int) -> list[tuple[int, FloatArray]]:
    """``shards`` contiguous id ranges as (offset, shard table with its own padding row 0)."""
    checked = check_table(table)
    num_items = len(checked) - 1
    if shards > num_items:
        raise ServingError(f"shards must be <= the number of items ({num_items}), got {shards}")
    bounds = [1 + (num_items * s) // shards for s in range(shards + 1)]
    padding = np.zeros((1, checked.shape[1]), dtype=np.float32)
    return [
        (lo - 1, np.concatenate([padding, checked[lo:hi]])) for lo, hi in itertools.pairwise(bounds)
    ]


def _slice_range(ids: IdArray, lo: int, hi: int) -> IdArray:
    """The part of a sorted id array within lo+1..hi."""
    return ids[np.searchsorted(ids, lo, "right") : np.searchsorted(ids, hi, "right")]


class ShardedIndex(ItemIndex):
    """The catalogue split into contiguous id ranges, one :class:`ItemIndex` per range.

    Shard ``s`` holds global ids ``offsets[s] + 1 .. offsets[s] + shards[s].num_items`` as its
    local ids ``1..``. Every shard returns its own top-k (searched concurrently on a small
    thread pool: numpy, faiss and socket waits release the GIL) and the results are merged.
    New items go to the last shard. ``recall`` is the minimum of the shards' recalls.
    """

    kind = "sharded"

    def __init__(self, shards: Sequence[ItemIndex], offsets: Sequence[int] | None = None) -> None:
        self.shards = list(shards)
        if not self.shards:
            raise ServingError("shards must contain at least one index")
        dims = {shard.dim for shard in self.shards}
        if len(dims) != 1:
            raise ServingError(f"shards must share one dim, got {sorted(dims)}")
        self.dim = dims.pop()
        expected = np.cumsum([0] + [shard.num_items for shard in self.shards[:-1]]).tolist()
        if offsets is not None and list(offsets) != expected:
            raise ServingError(
                f"offsets must make contiguous id ranges, expected {expected}, got {list(offsets)}"
            )
        self.offsets = [int(offset) for offset in expected]
        self.num_items = self.offsets[-1] + self.shards[-1].num_items
        recalls = [shard.recall for shard in self.shards if shard.recall is not None]
        self.recall = min(recalls) if recalls else None
        self._pool = (
            ThreadPoolExecutor(max_workers=min(len(self.shards), 8), thread_name_prefix="shard")
            if len(self.shards) > 1
            else None
        )

    @classmethod
    def build(
        cls,
        table: npt.ArrayLike,
        *,
        shards: int,
        make_shard: Callable[[FloatArray], ItemIndex],
    ) -> ShardedIndex:
        """Splits ``table`` into ``shards`` ranges and builds one index per range."""
        parts = [part for _, part in split_table(table, positive_int("shards", shards))]
        built: list[ItemIndex] = []
        try:
            for part in parts:
                built.append(make_shard(part))
        except BaseException:
            close_all(built)
            raise
        return cls(built)

    def _ranges(self) -> list[tuple[int, int]]:
        """(first global id - 1, last global id) of every shard."""
        return [
            (offset, offset + shard.num_items)
            for offset, shard in zip(self.offsets, self.shards, strict=True)
        ]

    def _search(
        self, queries: FloatArray, k: int, exclude: list[IdArray]
    ) -> tuple[IdArray, FloatArray]:
        ranges = self._ranges()

        def run(s: int) -> tuple[IdArray, FloatArray]:
            lo, hi = ranges[s]
            local = [_slice_range(e, lo, hi) - lo for e in exclude]
            ids, scores = self.shards[s].search(queries, k, local if any(map(len, local)) else None)
            return np.where(ids > 0, ids + lo, 0), scores

        if self._pool is None:
            results = [run(0)]
        else:
            results = list(self._pool.map(run, range(len(self.shards))))
        ids = np.concatenate([ids for ids, _ in results], axis=1)
        scores = np.concatenate([scores for _, scores in results], axis=1)
        return finish(*top_k(ids, scores, k), k)

    def _owner(self, ids: IdArray) -> npt.NDArray[np.intp]:
        """Index of the shard that holds each global id."""
        return np.searchsorted(np.asarray(self.offsets), ids, side="left") - 1

    def _vectors(self, ids: IdArray) -> FloatArray:
        owner = self._owner(ids)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for s in np.unique(owner):
            mask = owner == s
            out[mask] = self.shards[s].vectors(ids[mask] - self.offsets[s])
        return out

    def _add(self, ids: IdArray, vectors: FloatArray) -> None:
        # New ids (> num_items) land in the last shard: they continue its local numbering.
        owner = np.where(ids > self.num_items, len(self.shards) - 1, self._owner(ids))
        for s in np.unique(owner):
            mask = owner == s
            self.shards[s].add(ids[mask] - self.offsets[s], vectors[mask])
        self.num_items = self.offsets[-1] + self.shards[-1].num_items

    def _updated(self, ids: IdArray, vectors: FloatArray) -> ShardedIndex:
        owner = np.where(ids > self.num_items, len(self.shards) - 1, self._owner(ids))
        shards = []
        for s, shard in enumerate(self.shards):
            mask = owner == s
            shards.append(shard.updated(ids[mask] - self.offsets[s], vectors[mask]))
        # Unchanged shards are shared: they close as a no-op, so closing either sharded
        # index leaves them working for the other.
        return ShardedIndex(shards)

    def drift(self) -> float:
        return max(shard.drift() for shard in self.shards)

    def memory_bytes(self) -> int:
        """The sum over shards."""
        return sum(shard.memory_bytes() for shard in self.shards)

    def close(self) -> None:
        """Closes every shard and the search thread pool."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        close_all(self.shards)


def close_all(indexes: Sequence[ItemIndex]) -> None:
    """Closes every index, even when some close() calls fail (the first failure is raised)."""
    errors = []
    for index in indexes:
        try:
            index.close()
        except ServingError as exc:
            errors.append(str(exc))
    if errors:
        raise ServingError("; ".join(errors))


# --------------------------------------------------------------------------- factory
