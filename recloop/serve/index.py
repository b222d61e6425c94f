"""Item indexes: the top-K items by inner product for a batch of query vectors.

Conventions shared by every index (and relied on by the service):

* Item ids are ``1..num_items``; row 0 of an item table is padding and is never returned.
* Tables are float32 ``[num_items + 1, dim]``; a score is the inner product query·item.
* ``search`` returns ``(ids [B, k] int64, scores [B, k] float32)``, best first, ties broken by
  the smaller id. ``exclude[b]`` lists ids never to return for row ``b``; ids outside
  ``1..num_items`` in it are ignored. When fewer than ``k`` items are eligible the tail is
  padded with id 0 and score ``-inf``.

Implementations: :class:`ExactIndex` (blocked matmul, optionally int8 rows), :class:`IVFIndex`
(faiss ``IndexIVFFlat``, nprobe tuned to a recall target), :class:`ShardedIndex` (contiguous id
ranges searched concurrently, possibly in other processes: ``recloop.serve.index_remote``).
:func:`build_index` is the factory the service uses.
"""

from __future__ import annotations

import copy
import itertools
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from recloop.errors import ServingError

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]
Exclude = Sequence[npt.ArrayLike | None] | None

KINDS = ("exact", "exact-int8", "ivf")
# The options build_index accepts for each kind (all JSON-able, so remote shards can take them).
KIND_OPTIONS: dict[str, frozenset[str]] = {
    "exact": frozenset({"block_rows"}),
    "exact-int8": frozenset({"block_rows", "rerank"}),
    "ivf": frozenset(
        {"nlist", "nprobe", "min_recall", "tune_queries", "threads", "train_threads", "seed"}
    ),
}
# Exact search scores at most this many floats at once (16 MiB): bounded memory for any batch.
SCORE_BUDGET = 1 << 22
RECALL_K = 10  # recall@10 is what min_recall targets
RECALL_QUERIES = 256  # probe queries used to tune nprobe at build time
# k-means trains on this many sampled rows per list: faiss's own minimum (it warns below 39);
# more barely moves recall and training dominates the build time (1M items: ~45 s at 39).
TRAIN_POINTS_PER_LIST = 39
# Below this many items OpenMP start-up and spinning on shared cores cost more than threads save.
PARALLEL_BUILD_ITEMS = 100_000
RERANK_MARGIN = 16  # int8 scans keep k + max(k, this) candidates for the float32 re-rank
_EMPTY_IDS = np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------- interface


class ItemIndex(ABC):
    """Top-K inner-product search over items ``1..num_items``.

    The public methods validate their arguments (raising :class:`ServingError` that names the
    parameter) and hand normalised arrays to the ``_search``/``_vectors``/``_add`` hooks.
    """

    kind: str = ""
    num_items: int
    dim: int
    recall: float | None = None  # recall@10 vs exact, where the index measured it

    def search(
        self, queries: npt.ArrayLike, k: int, exclude: Exclude = None
    ) -> tuple[IdArray, FloatArray]:
        """queries [B, dim] -> (ids [B, k] int64, scores [B, k] float32), best first."""
        q = check_queries(queries, self.dim)
        k = check_k(k)
        lists = normalise_exclude(exclude, len(q), self.num_items)
        if len(q) == 0:
            return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
        return self._search(q, k, lists)

    def vectors(self, ids: npt.ArrayLike) -> FloatArray:
        """The float32 rows [N, dim] of the given item ids (for "similar items")."""
        return self._vectors(check_ids(ids, self.num_items))

    def add(self, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Updates rows of existing items and/or appends new items ``num_items+1..`` (contiguous).

        New items are searchable as soon as this returns.
        """
        checked_ids, checked = check_add(ids, vectors, self.num_items, self.dim)
        if len(checked_ids):
            self._add(checked_ids, checked)

    def updated(self, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> ItemIndex:
        """A new index: this one with :meth:`add` applied (copy-on-write). This index is left
        exactly as it is, so searches running on it meanwhile see no change; with nothing to
        change, this index itself. Raises ServingError for an index that cannot be copied
        (remote shards): build a new one instead.
        """
        checked_ids, checked = check_add(ids, vectors, self.num_items, self.dim)
        if not len(checked_ids):
            return self
        return self._updated(checked_ids, checked)

    def drift(self) -> float:
        """The fraction of items added or moved since the index was trained (0 for indexes
        that are not trained). An IVF index assigns them to centroids trained without them, so
        its recall can degrade as this grows; rebuild it past a threshold."""
        return 0.0

    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes this index holds for its items (see each implementation for what counts)."""

    def close(self) -> None:  # noqa: B027 (a deliberate no-op default)
        """Releases resources (remote processes, thread pools). Local indexes: nothing to do."""

    @abstractmethod
    def _search(
        self, queries: FloatArray, k: int, exclude: list[IdArray]
    ) -> tuple[IdArray, FloatArray]:
        """Validated input: queries [B>=1, dim] float32, k >= 1, exclude: B sorted id arrays."""

    @abstractmethod
    def _vectors(self, ids: IdArray) -> FloatArray:
        """ids: 1-D, all within 1..num_items."""

    @abstractmethod
    def _add(self, ids: IdArray, vectors: FloatArray) -> None:
        """ids unique; those > num_items are exactly num_items+1..num_items+m."""

    def _updated(self, ids: IdArray, vectors: FloatArray) -> ItemIndex:
        """As ``_add``, into a copy of this index (non-empty ids)."""
        raise ServingError(f"a {self.kind} index cannot be updated copy-on-write; build a new one")


# --------------------------------------------------------------------------- validation


def check_table(table: npt.ArrayLike, name: str = "table") -> FloatArray:
    """A C-contiguous float32 [num_items + 1, dim] table with at least one item, all finite."""
    array = np.ascontiguousarray(table, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] < 2 or array.shape[1] < 1:
        raise ServingError(
            f"{name} must be a 2-D array [num_items + 1, dim] with at least one item "
            f"(row 0 is padding), got shape {array.shape}"
        )
    if not np.isfinite(array).all():
        raise ServingError(f"{name} contains NaN or inf values")
    return array


def check_queries(queries: npt.ArrayLike, dim: int) -> FloatArray:
    array = np.ascontiguousarray(queries, dtype=np.float32)
    if array.ndim != 2:
        raise ServingError(f"queries must be a 2-D array [batch, dim], got shape {array.shape}")
    if array.shape[1] != dim:
        raise ServingError(f"queries have dim {array.shape[1]} but the index has dim {dim}")
    if not np.isfinite(array).all():
        raise ServingError("queries contain NaN or inf values")
    return array


def check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ServingError(f"k must be an integer, got {k!r}")
    if k < 1:
        raise ServingError(f"k must be >= 1, got {k}")
    return int(k)


def check_ids(ids: npt.ArrayLike, num_items: int, name: str = "ids") -> IdArray:
    """1-D int64 item ids, each within 1..num_items."""
    array = np.asarray(ids)
    if array.size == 0:
        return _EMPTY_IDS
    if not np.issubdtype(array.dtype, np.integer):
        raise ServingError(f"{name} must be integer item ids, got dtype {array.dtype}")
    array = array.astype(np.int64).ravel()
    bad = array[(array < 1) | (array > num_items)]
    if len(bad):
        raise ServingError(f"{name} must be item ids in 1..{num_items}, got {int(bad[0])}")
    return array


def check_add(
    ids: npt.ArrayLike, vectors: npt.ArrayLike, num_items: int, dim: int
) -> tuple[IdArray, FloatArray]:
    """Validates an ``add``: unique ids, existing or contiguous new ones, finite [N, dim] rows."""
    id_array = np.asarray(ids)
    if id_array.size and not np.issubdtype(id_array.dtype, np.integer):
        raise ServingError(f"ids must be integer item ids, got dtype {id_array.dtype}")
    id_array = id_array.astype(np.int64).ravel()
    rows = np.ascontiguousarray(vectors, dtype=np.float32)
    if rows.ndim != 2 or rows.shape != (len(id_array), dim):
        raise ServingError(
            f"vectors must have shape ({len(id_array)}, {dim}) for {len(id_array)} ids, "
            f"got {rows.shape}"
        )
    if not np.isfinite(rows).all():
        raise ServingError("vectors contain NaN or inf values")
    unique = np.unique(id_array)
    if len(unique) != len(id_array):
        raise ServingError("ids contain duplicates; add each item once per call")
    if len(unique) and unique[0] < 1:
        raise ServingError(f"ids must be >= 1 (0 is padding), got {int(unique[0])}")
    new = unique[unique > num_items]
    if len(new) and not np.array_equal(new, np.arange(num_items + 1, num_items + 1 + len(new))):
        raise ServingError(
            f"new item ids must be contiguous from {num_items + 1}, got {new[:5].tolist()}"
        )
    return id_array, rows


def normalise_exclude(exclude: Exclude, batch: int, num_items: int) -> list[IdArray]:
    """One sorted, unique id array per query row; ids outside 1..num_items are dropped."""
    if exclude is None:
        return [_EMPTY_IDS] * batch
    if isinstance(exclude, np.ndarray) and exclude.ndim < 2:
        raise ServingError("exclude must be a sequence with one id array (or None) per query")
    if len(exclude) != batch:
        raise ServingError(f"exclude has {len(exclude)} rows but queries have {batch}")
    lists = []
    for row in exclude:
        if row is None:
            lists.append(_EMPTY_IDS)
            continue
        array = np.asarray(row)
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise ServingError(f"exclude rows must be integer item ids, got dtype {array.dtype}")
        array = array.astype(np.int64).ravel()
        lists.append(np.unique(array[(array >= 1) & (array <= num_items)]))
    return lists


def flatten_exclude(exclude: list[IdArray]) -> tuple[IdArray, IdArray]:
    """(query rows, item ids) of every exclusion, sorted by item id (for per-block slicing)."""
    rows = np.repeat(np.arange(len(exclude), dtype=np.int64), [len(e) for e in exclude])
    ids = np.concatenate(exclude) if exclude else _EMPTY_IDS
    order = np.argsort(ids, kind="stable")
    return rows[order], ids[order]


# --------------------------------------------------------------------------- top-k helpers


def _torch_view(array: npt.NDArray[Any]) -> torch.Tensor:
    """A tensor sharing the array's memory (a copy only for read-only arrays, which torch
    refuses to wrap)."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def scores_against(queries: FloatArray, rows: FloatArray) -> FloatArray:
    """queries [B, d] · rows [n, d]ᵀ as a fresh float32 [B, n] array.

    torch's GEMM, not numpy's: on the serving path (one BLAS thread) OpenBLAS took 3x longer
    than torch on this transposed product (Beauty, B=16, n=12,101: 1.3 ms vs 0.4 ms)."""
    return (_torch_view(queries) @ _torch_view(rows).T).numpy()


def _top_k(ids: IdArray, scores: FloatArray, k: int) -> tuple[IdArray, FloatArray]:
    """The k best columns of each row, in no particular order (argpartition, O(n))."""
    n = scores.shape[1]
    if n <= k:
        return ids, scores
    part = np.argpartition(scores, n - k, axis=1)[:, n - k :]
    return np.take_along_axis(ids, part, axis=1), np.take_along_axis(scores, part, axis=1)


def finish(ids: IdArray, scores: FloatArray, k: int) -> tuple[IdArray, FloatArray]:
    """Sorts candidates best first (ties: smaller id), blanks -inf ones, pads/cuts to k."""
    ids = np.where(np.isneginf(scores), 0, ids)
    order = np.lexsort((ids, -scores), axis=1)
    ids = np.take_along_axis(ids, order, axis=1)[:, :k]
    scores = np.take_along_axis(scores, order, axis=1)[:, :k]
    missing = k - ids.shape[1]
    if missing > 0:
        batch = ids.shape[0]
        ids = np.concatenate([ids, np.zeros((batch, missing), dtype=np.int64)], axis=1)
        scores = np.concatenate(
            [scores, np.full((batch, missing), -np.inf, dtype=np.float32)], axis=1
        )
    return np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(scores, np.float32)


BlockScorer = Callable[[FloatArray, int, int], FloatArray]


def blocked_search(
    score_block: BlockScorer,
    queries: FloatArray,
    num_items: int,
    k: int,
    exclude: list[IdArray],
    block_rows: int,
) -> tuple[IdArray, FloatArray]:
    """Exact top-k over items 1..num_items, scoring ``block_rows`` items at a time.

    ``score_block(queries, start, stop)`` returns fresh scores [B, stop - start] for items
    ``start..stop-1``. Memory stays at one block of scores plus a running [B, k] top-k, so a
    1M-item catalogue never materialises [B, num_items].
    """
    batch = len(queries)
    kept = min(k, num_items)  # more columns than items can only be padding
    best_ids = np.zeros((batch, kept), dtype=np.int64)
    best_scores = np.full((batch, kept), -np.inf, dtype=np.float32)
    ex_rows, ex_ids = flatten_exclude(exclude)
    for start in range(1, num_items + 1, block_rows):
        stop = min(start + block_rows, num_items + 1)
        scores = score_block(queries, start, stop)
        lo, hi = np.searchsorted(ex_ids, [start, stop])
        if hi > lo:  # exclusions that fall in this block
            scores[ex_rows[lo:hi], ex_ids[lo:hi] - start] = -np.inf
        block_ids, block_scores = _block_top_k(scores, start, kept)
        if start == 1:  # first block: nothing to merge with yet
            best_ids, best_scores = block_ids, block_scores
            continue
        best_ids, best_scores = _top_k(
            np.concatenate([best_ids, block_ids], axis=1),
            np.concatenate([best_scores, block_scores], axis=1),
            kept,
        )
    return finish(best_ids, best_scores, k)


def _block_top_k(scores: FloatArray, start: int, k: int) -> tuple[IdArray, FloatArray]:
    """The k best columns of a score block as item ids (column + start) and scores."""
    n = scores.shape[1]
    if n <= k:
        columns = np.arange(start, start + n, dtype=np.int64)
        return np.broadcast_to(columns, scores.shape).copy(), scores
    # torch.topk, not np.argpartition: 4x faster on a [16, 12,101] block with one thread.
    top = torch.topk(torch.from_numpy(scores), k, dim=1, sorted=False)
    return top.indices.numpy() + start, top.values.numpy()


def exact_search(
    table: FloatArray, queries: FloatArray, k: int, exclude: list[IdArray] | None = None
) -> tuple[IdArray, FloatArray]:
    """Exact top-k straight from a float32 table (no copy): the reference for recall."""
    num_items = len(table) - 1

    def score(q: FloatArray, start: int, stop: int) -> FloatArray:
        return scores_against(q, table[start:stop])

    lists = exclude if exclude is not None else [_EMPTY_IDS] * len(queries)
    rows = max(1024, SCORE_BUDGET // max(1, len(queries)))
    return blocked_search(score, queries, num_items, k, lists, rows)


def recall_at_k(found: IdArray, truth: IdArray) -> float:
    """Mean over rows of |found ∩ truth| / |truth| (padding id 0 ignored); rows are unique."""
    valid = truth > 0
    hits = (found[:, :, None] == truth[:, None, :]) & valid[:, None, :]
    total = int(valid.sum())
    return float(hits.sum()) / total if total else 1.0


def measure_recall(
    index: ItemIndex, reference: ItemIndex, queries: npt.ArrayLike, k: int = RECALL_K
) -> float:
    """recall@k of ``index`` against ``reference`` (usually an exact index) on ``queries``."""
    found, _ = index.search(queries, k)
    truth, _ = reference.search(queries, k)
    return recall_at_k(found, truth)


# --------------------------------------------------------------------------- growable storage


class _Rows:
    """An array with spare capacity, so appending items is amortised O(1) instead of a copy."""

    def __init__(self, initial: npt.NDArray[Any], spare: int = 0) -> None:
        self.data = np.empty((len(initial) + spare, *initial.shape[1:]), dtype=initial.dtype)
        self.data[: len(initial)] = initial
        self.size = len(initial)

    def view(self) -> npt.NDArray[Any]:
        return self.data[: self.size]

    def copy(self, spare: int = 0) -> _Rows:
        """A copy with room for ``spare`` more rows (one allocation for a copy that grows)."""
        return _Rows(self.view(), spare)

    def append(self, rows: npt.NDArray[Any]) -> None:
        needed = self.size + len(rows)
        if needed > len(self.data):
            capacity = max(needed, len(self.data) * 3 // 2)
            grown = np.empty((capacity, *self.data.shape[1:]), dtype=self.data.dtype)
            grown[: self.size] = self.data[: self.size]
            self.data = grown  # published before size grows: readers never overrun
        self.data[self.size : needed] = rows
        self.size = needed


def _quantize_int8(rows: FloatArray) -> tuple[npt.NDArray[np.int8], FloatArray]:
    """Per-row symmetric int8 codes and scales: row ≈ codes * scale, |error| <= scale / 2."""
    peak = np.abs(rows).max(axis=1) if rows.size else np.zeros(len(rows), dtype=np.float32)
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(rows / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales


# --------------------------------------------------------------------------- exact


class ExactIndex(ItemIndex):
    """Brute force: blocked matmul over all items with a running per-query top-k.

    ``quantize="int8"`` (kind ``"exact-int8"``) scans per-row symmetric int8 codes with a float32
    scale per row. numpy has no fast int8 matmul, so each block is dequantised on the fly and
    scored against the float32 query. Then, with ``rerank=True`` (the default), the best
    ``k + max(k, RERANK_MARGIN)`` candidates are re-scored with the float32 rows, which are kept
    for that: returned scores are exact and recall@10 is ~1.0, but memory is *larger* than the
    float32 index (codes + scales + rows; ``memory_bytes`` counts all three). With
    ``rerank=False`` only codes and scales are kept (``dim + 4`` bytes per item instead of
    ``4 * dim``): scores are inner products with the dequantised rows (per-component error
    <= scale / 2, recall@10 ~0.98 on clustered data) and ``vectors`` returns dequantised rows.

    Thread safety: searches may run concurrently with each other and with ``add``; a search
    sees the items that existed when it started (an in-place row update may be seen by it).
    """

    def __init__(
        self,
        table: npt.ArrayLike,
        *,
        block_rows: int | None = None,
        quantize: str | None = None,
        rerank: bool = True,
    ) -> None:
        checked = check_table(table)
        if quantize not in (None, "int8"):
            raise ServingError(f"quantize must be None or 'int8', got {quantize!r}")
        if block_rows is not None:
            block_rows = positive_int("block_rows", block_rows)
        self.kind = "exact" if quantize is None else "exact-int8"
        self.dim = checked.shape[1]
        self.block_rows = block_rows
        self.rerank = quantize is not None and bool(rerank)
        self._write_lock = threading.Lock()
        self._floats: _Rows | None = None
        self._codes: _Rows | None = None
        self._scales: _Rows | None = None
        if quantize is None or self.rerank:
            self._floats = _Rows(checked)
        if quantize is not None:
            codes, scales = _quantize_int8(checked)
            self._codes, self._scales = _Rows(codes), _Rows(scales)
        self.num_items = len(checked) - 1

    def memory_bytes(self) -> int:
        """Allocated bytes of all item rows held: float32 rows, int8 codes, float32 scales."""
        stores = (self._floats, self._codes, self._scales)
        return sum(store.data.nbytes for store in stores if store is not None)

    def _block_rows(self, batch: int) -> int:
        if self.block_rows is not None:
            return self.block_rows
        rows = SCORE_BUDGET // batch
        if self._codes is not None:  # a dequantised block is [rows, dim] float32 too
            rows = min(rows, SCORE_BUDGET // self.dim)
        return max(1024, rows)

    def _scorer(self) -> BlockScorer:
        """A block scorer over a snapshot of the storage (safe against concurrent growth)."""
        if self._codes is None:
            assert self._floats is not None
            table: FloatArray = self._floats.data

            def score(q: FloatArray, start: int, stop: int) -> FloatArray:
                return scores_against(q, table[start:stop])

            return score
        assert self._scales is not None
        codes: npt.NDArray[np.int8] = self._codes.data
        scales: FloatArray = self._scales.data

        def score_int8(q: FloatArray, start: int, stop: int) -> FloatArray:
            # (q · codes) * scale == q · (codes * scale), with the cheaper [B, n] multiply.
            block = codes[start:stop].astype(np.float32)
            return scores_against(q, block) * scales[start:stop]

        return score_int8

    def _search(
        self, queries: FloatArray, k: int, exclude: list[IdArray]
    ) -> tuple[IdArray, FloatArray]:
        num_items = self.num_items  # read before the storage: it only ever grows after it
        score = self._scorer()
        rows = self._block_rows(len(queries))
        if not self.rerank:
            return blocked_search(score, queries, num_items, k, exclude, rows)
        wide = min(k + max(k, RERANK_MARGIN), num_items)
        ids, _ = blocked_search(score, queries, num_items, wide, exclude, rows)
        return self._rescore(queries, ids, k)

    def _rescore(self, queries: FloatArray, ids: IdArray, k: int) -> tuple[IdArray, FloatArray]:
        """Exact float32 scores for candidate ids [B, n] (0 = none), best k kept."""
        assert self._floats is not None
        table: FloatArray = self._floats.data
        scores = np.einsum("bd,bnd->bn", queries, table[ids]).astype(np.float32)
        scores[ids == 0] = -np.inf
        return finish(ids, scores, k)

    def _vectors(self, ids: IdArray) -> FloatArray:
        if self._floats is not None:
            table: FloatArray = self._floats.data
            return table[ids]  # fancy indexing copies
        assert self._codes is not None and self._scales is not None
        scales: FloatArray = self._scales.data[ids, None]
        return self._codes.data[ids].astype(np.float32) * scales

    def _add(self, ids: IdArray, vectors: FloatArray) -> None:
        with self._write_lock:
            old = ids <= self.num_items
            order = np.argsort(ids[~old])  # new ids are contiguous: sort = append order
            if self._floats is not None:
                self._floats.data[ids[old]] = vectors[old]
                self._floats.append(vectors[~old][order])
            if self._codes is not None and self._scales is not None:
                codes, scales = _quantize_int8(vectors)
                self._codes.data[ids[old]] = codes[old]
                self._scales.data[ids[old]] = scales[old]
                self._codes.append(codes[~old][order])
                self._scales.append(scales[~old][order])
            self.num_items += int((~old).sum())

    def _updated(self, ids: IdArray, vectors: FloatArray) -> ExactIndex:
        spare = int((ids > self.num_items).sum())
        with self._write_lock:  # a consistent snapshot of the storage
            clone = copy.copy(self)  # the settings; the storage is replaced below
            clone._write_lock = threading.Lock()
            clone._floats = self._floats.copy(spare) if self._floats is not None else None
            clone._codes = self._codes.copy(spare) if self._codes is not None else None
            clone._scales = self._scales.copy(spare) if self._scales is not None else None
        clone._add(ids, vectors)
        return clone


def positive_int(name: str, value: Any, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ServingError(f"{name} must be an integer >= 1, got {value!r}")
    if upper is not None and value > upper:
        raise ServingError(f"{name} must be <= {upper}, got {value}")
    return int(value)


# --------------------------------------------------------------------------- sharded


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
        concurrent: bool = False,
    ) -> ShardedIndex:
        """Splits ``table`` into ``shards`` ranges and builds one index per range.

        ``concurrent`` builds them on threads (worth it when each build waits on a process).
        """
        parts = [part for _, part in split_table(table, positive_int("shards", shards))]
        if not concurrent or len(parts) == 1:
            built: list[ItemIndex] = []
            try:
                for part in parts:
                    built.append(make_shard(part))
            except BaseException:
                _close_all(built)
                raise
            return cls(built)
        with ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix="shard-build") as pool:
            futures = [pool.submit(make_shard, part) for part in parts]
        failures = [f.exception() for f in futures if f.exception() is not None]
        if failures:  # close the shards that did start (remote processes) before raising
            _close_all([f.result() for f in futures if f.exception() is None])
            raise failures[0]  # type: ignore[misc]
        return cls([f.result() for f in futures])

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
        return finish(*_top_k(ids, scores, k), k)

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
        # Unchanged shards are shared: local ones close as a no-op, so closing either
        # sharded index leaves them working for the other (remote shards cannot update).
        return ShardedIndex(shards)

    def drift(self) -> float:
        return max(shard.drift() for shard in self.shards)

    def memory_bytes(self) -> int:
        """The sum over shards (remote shards report their own process's index)."""
        return sum(shard.memory_bytes() for shard in self.shards)

    def close(self) -> None:
        """Closes every shard (stopping remote processes) and the search thread pool."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        _close_all(self.shards)


def _close_all(indexes: Sequence[ItemIndex]) -> None:
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


def make_local_index(table: npt.ArrayLike, kind: str, **options: Any) -> ItemIndex:
    """One in-process index of ``kind`` (options already validated by build_index)."""
    if kind == "ivf":
        # Imported here: faiss (and its OpenMP runtime) loads only when an IVF index is built.
        from recloop.serve.index_ivf import IVFIndex

        return IVFIndex(table, **options)
    if kind == "exact-int8":
        return ExactIndex(table, quantize="int8", **options)
    return ExactIndex(table, **options)


def check_build_args(kind: str, shards: int, options: dict[str, Any]) -> None:
    if kind not in KINDS:
        raise ServingError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS)}")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ServingError(f"shards must be an integer >= 1, got {shards!r}")
    unknown = sorted(set(options) - KIND_OPTIONS[kind])
    if unknown:
        allowed = ", ".join(sorted(KIND_OPTIONS[kind]))
        raise ServingError(
            f"unknown option(s) for index kind {kind!r}: {', '.join(unknown)} (allowed: {allowed})"
        )


def build_index(
    table: npt.ArrayLike,
    kind: str = "exact",
    *,
    shards: int = 1,
    remote: bool = False,
    **options: Any,
) -> ItemIndex:
    """The index the service searches: ``kind`` in ``exact``, ``exact-int8``, ``ivf``.

    ``shards > 1`` splits the catalogue into contiguous ranges (:class:`ShardedIndex`);
    ``remote=True`` runs every shard in its own process (:class:`RemoteShard`). ``options`` go
    to each shard's index: ``block_rows`` (exact kinds), ``rerank`` (exact-int8); for ivf
    ``nlist``, ``nprobe``, ``min_recall``, ``threads``, ``train_threads``, ``seed``.
    """
    check_build_args(kind, shards, options)
    checked = check_table(table)
    if shards > len(checked) - 1:
        raise ServingError(
            f"shards must be <= the number of items ({len(checked) - 1}), got {shards}"
        )
    make: Callable[[FloatArray], ItemIndex]
    if remote:
        from recloop.serve.index_remote import start_shard_process

        def make(part: FloatArray) -> ItemIndex:
            return start_shard_process(part, kind, **options)
    else:

        def make(part: FloatArray) -> ItemIndex:
            return make_local_index(part, kind, **options)

    if shards == 1:
        return make(checked)
    return ShardedIndex.build(checked, shards=shards, make_shard=make, concurrent=remote)
