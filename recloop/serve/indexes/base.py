"""Item indexes: the top-K items by inner product for a batch of query vectors.

Conventions shared by every index (and relied on by the service):

* Item ids are ``1..num_items``; row 0 of an item table is padding and is never returned.
* Tables are float32 ``[num_items + 1, dim]``; a score is the inner product query·item.
* ``search`` returns ``(ids [B, k] int64, scores [B, k] float32)``, best first, ties broken by
  the smaller id. ``exclude[b]`` lists ids never to return for row ``b``; ids outside
  ``1..num_items`` in it are ignored. When fewer than ``k`` items are eligible the tail is
  padded with id 0 and score ``-inf``.

Implementations, one module each: ``exact`` (blocked matmul, optionally int8 rows), ``ivf``
(faiss ``IndexIVFFlat``, nprobe tuned to a recall target), ``milvus`` (a Milvus collection
behind an alias, through pymilvus; milvus-lite by default: the index outside the serving
process, on an engine that shards and replicates itself), ``sharded`` (contiguous id ranges
searched concurrently).
:func:`recloop.serve.indexes.factory.build_index` is the factory the service uses.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from recloop.errors import ServingError

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]
Exclude = Sequence[npt.ArrayLike | None] | None

KINDS = ("exact", "exact-int8", "ivf", "milvus", "milvus-ivf")
MILVUS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}")  # collection and alias names
# The options build_index accepts for each kind.
KIND_OPTIONS: dict[str, frozenset[str]] = {
    "exact": frozenset({"block_rows"}),
    "exact-int8": frozenset({"block_rows", "rerank"}),
    "ivf": frozenset(
        {"nlist", "nprobe", "min_recall", "tune_queries", "threads", "train_threads", "seed"}
    ),
    "milvus": frozenset({"uri", "alias", "tune_queries", "seed"}),
    "milvus-ivf": frozenset({"uri", "alias", "tune_queries", "seed", "nlist", "min_recall"}),
}
# Kinds whose index lives outside this process and shards itself: one per service, in-process.
UNSHARDED_KINDS = frozenset({"milvus", "milvus-ivf"})
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
EMPTY_IDS = np.zeros(0, dtype=np.int64)
# Milvus servers and clusters; anything else must be a milvus-lite database file.
SERVER_SCHEMES = ("http://", "https://", "tcp://", "grpc://")


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
        change, this index itself.
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
        """Releases resources (thread pools, a Milvus client). Most indexes: nothing to do."""

    def unavailable(self) -> str | None:
        """Why searches fail now (a vector database that stopped answering), or None. The
        service reports it in /readyz so that a balancer sends traffic elsewhere. In-process
        indexes are always available."""
        return None

    def probe(self) -> None:  # noqa: B027 (a deliberate no-op default)
        """Checks again whether an unavailable index answers (clears :meth:`unavailable`
        when it does); blocking, called off the event loop. In-process: nothing to check."""

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
        return EMPTY_IDS
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
        return [EMPTY_IDS] * batch
    if isinstance(exclude, np.ndarray) and exclude.ndim < 2:
        raise ServingError("exclude must be a sequence with one id array (or None) per query")
    if len(exclude) != batch:
        raise ServingError(f"exclude has {len(exclude)} rows but queries have {batch}")
    arrays = []
    for row in exclude:
        if row is None:
            arrays.append(EMPTY_IDS)
            continue
        array = np.asarray(row)
        if array.size and array.dtype.kind not in "iu":  # np.issubdtype(_, np.integer)
            raise ServingError(f"exclude rows must be integer item ids, got dtype {array.dtype}")
        arrays.append(array.astype(np.int64, copy=False).ravel())
    # One np.unique over the whole batch instead of one per row: on the serving path that
    # was a sixth of an exact search, all of it holding the GIL the HTTP loop waits for.
    # Keys row * stride + id sort by row, then id; the row boundaries split them back.
    if batch == 1:
        only = arrays[0]
        return [np.unique(only[(only >= 1) & (only <= num_items)])]
    flat = np.concatenate(arrays)
    rows = np.repeat(np.arange(batch, dtype=np.int64), [len(array) for array in arrays])
    valid = (flat >= 1) & (flat <= num_items)
    stride = num_items + 1
    keys = np.unique(rows[valid] * stride + flat[valid])
    bounds = np.searchsorted(keys, np.arange(batch + 1, dtype=np.int64) * stride).tolist()
    ids = keys % stride
    return [ids[bounds[row] : bounds[row + 1]] for row in range(batch)]


def flatten_exclude(exclude: list[IdArray]) -> tuple[IdArray, IdArray]:
    """(query rows, item ids) of every exclusion, sorted by item id (for per-block slicing)."""
    rows = np.repeat(np.arange(len(exclude), dtype=np.int64), [len(e) for e in exclude])
    ids = np.concatenate(exclude) if exclude else EMPTY_IDS
    order = np.argsort(ids, kind="stable")
    return rows[order], ids[order]


def mask_excluded(ids: IdArray, scores: FloatArray, exclude: list[IdArray], num_items: int) -> None:
    """Sets scores[b, j] to -inf in place where candidate ids[b, j] is in exclude[b]: one
    membership test over (row, id) keys, for indexes that over-fetch and then filter."""
    ex_rows, ex_ids = flatten_exclude(exclude)
    width = num_items + 1
    keys = np.arange(len(ids), dtype=np.int64)[:, None] * width + ids
    scores[np.isin(keys, ex_rows * width + ex_ids)] = -np.inf


# --------------------------------------------------------------------------- top-k helpers


def torch_view(array: npt.NDArray[Any]) -> torch.Tensor:
    """A tensor sharing the array's memory (a copy only for read-only arrays, which torch
    refuses to wrap)."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def scores_against(queries: FloatArray, rows: FloatArray) -> FloatArray:
    """queries [B, d] · rows [n, d]ᵀ as a fresh float32 [B, n] array.

    numpy's GEMM (OpenBLAS), not torch's: timed call by call in alternation on the serving
    path (one BLAS thread, Beauty sizes), torch's took longer at every batch size
    (bench/serve_profile.py, bench/results/serve-profile-20.json); an earlier measurement
    that favoured torch timed them one after the other, on a machine whose speed varies."""
    product: FloatArray = np.matmul(queries, rows.T)
    return product


def top_k(ids: IdArray, scores: FloatArray, k: int) -> tuple[IdArray, FloatArray]:
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
        block_ids, block_scores = _blocktop_k(scores, start, kept)
        if start == 1:  # first block: nothing to merge with yet
            best_ids, best_scores = block_ids, block_scores
            continue
        best_ids, best_scores = top_k(
            np.concatenate([best_ids, block_ids], axis=1),
            np.concatenate([best_scores, block_scores], axis=1),
            kept,
        )
    return finish(best_ids, best_scores, k)


def _blocktop_k(scores: FloatArray, start: int, k: int) -> tuple[IdArray, FloatArray]:
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

    lists = exclude if exclude is not None else [EMPTY_IDS] * len(queries)
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


def tune_nprobe(
    search_at: Callable[[int], IdArray],
    truth: IdArray,
    nlist: int,
    min_recall: float,
    start: int = 1,
) -> tuple[int, float]:
    """(nprobe, recall@k): nprobe doubles from ``start`` until the ids ``search_at(nprobe)``
    returns reach ``min_recall`` against ``truth`` (the exact top-k), or every list is probed.
    The IVF indexes (faiss in-process, IVF_FLAT in Milvus) tune with it at build time."""
    nprobe = start
    while True:
        recall = recall_at_k(search_at(nprobe), truth)
        if recall >= min_recall or nprobe >= nlist:
            return nprobe, recall
        nprobe = min(nlist, nprobe * 2)


def probe_queries(table: FloatArray, seed: int, count: int = RECALL_QUERIES) -> FloatArray:
    """Sampled table rows plus Gaussian noise (half the rows' spread): realistic queries."""
    rng = np.random.default_rng(seed + 1)
    num_items = len(table) - 1
    ids = 1 + rng.choice(num_items, size=min(count, num_items), replace=False)
    rows = table[ids]
    noise = rng.normal(0.0, 0.5 * float(rows.std()) + 1e-12, size=rows.shape)
    return np.ascontiguousarray(rows + noise, dtype=np.float32)


def positive_int(name: str, value: Any, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ServingError(f"{name} must be an integer >= 1, got {value!r}")
    if upper is not None and value > upper:
        raise ServingError(f"{name} must be <= {upper}, got {value}")
    return int(value)


def check_index_uri(uri: str) -> str:
    """A Milvus server URI or a milvus-lite file path ending in .db whose folder exists."""
    if not isinstance(uri, str) or not uri:
        raise ServingError(f"index_uri (--index-uri) must be a non-empty string, got {uri!r}")
    if uri.startswith(SERVER_SCHEMES):
        return uri
    path = Path(uri)
    if path.suffix != ".db" or "://" in uri:
        raise ServingError(
            "index_uri (--index-uri) must be a Milvus server URI (http://host:19530) or a "
            f"milvus-lite file ending in .db, got {uri!r}"
        )
    if not path.parent.is_dir():
        raise ServingError(f"index_uri (--index-uri): folder {str(path.parent)!r} does not exist")
    return uri


def default_nlist(num_items: int) -> int:
    """≈ 4·sqrt(N) lists, at most N/39 (faiss wants >= 39 training points per list)."""
    if num_items < 100:  # too few items for clustering to pay off: one list = exact
        return 1
    return int(np.clip(round(4 * math.sqrt(num_items)), 1, max(1, num_items // 39)))


def check_build_args(kind: str, shards: int, options: dict[str, Any]) -> None:
    """Raises ServingError naming a bad kind, shard count or option of build_index."""
    if kind not in KINDS:
        raise ServingError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS)}")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ServingError(f"shards must be an integer >= 1, got {shards!r}")
    if kind in UNSHARDED_KINDS and shards != 1:
        raise ServingError(
            f"a {kind} index cannot be sharded here (Milvus shards itself): "
            f"shards must be 1, got {shards}"
        )
    unknown = sorted(set(options) - KIND_OPTIONS[kind])
    if unknown:
        allowed = ", ".join(sorted(KIND_OPTIONS[kind]))
        raise ServingError(
            f"unknown option(s) for index kind {kind!r}: {', '.join(unknown)} (allowed: {allowed})"
        )
