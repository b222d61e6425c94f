"""The approximate item index: faiss IVF-Flat with inner product, recall tuned at build time.

Its own module so that faiss loads only when an IVF index is built.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import threading
from collections.abc import Iterator
from typing import cast

import faiss
import numpy as np
import numpy.typing as npt

from recloop.errors import ServingError
from recloop.serve.indexes.base import (
    PARALLEL_BUILD_ITEMS,
    RECALL_K,
    TRAIN_POINTS_PER_LIST,
    FloatArray,
    IdArray,
    ItemIndex,
    check_queries,
    check_table,
    default_nlist,
    exact_search,
    finish,
    mask_excluded,
    measure_recall,
    positive_int,
    probe_queries,
    tune_nprobe,
)


def default_nprobe(nlist: int) -> int:
    """≈ sqrt(nlist), at least 8: a good recall/speed trade-off without tuning."""
    return min(nlist, max(8, round(math.sqrt(nlist))))


@contextlib.contextmanager
def omp_threads(count: int) -> Iterator[None]:
    """faiss's OpenMP thread count for this thread only while inside (it is per thread)."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


class IVFIndex(ItemIndex):
    """faiss ``IndexIVFFlat`` (inner product) over items 1..N; approximate, tunable recall.

    ``min_recall`` tunes ``nprobe`` at build time: ``tune_queries`` (real user vectors; perturbed
    table rows when absent) with their exact top-10 as truth, and nprobe doubles until
    recall@10 >= min_recall (or nprobe == nlist).
    ``recall`` and ``nprobe`` record the outcome. faiss uses ``threads`` OpenMP threads for
    searches (default 1: serving shares its cores) and ``train_threads`` for k-means and adding
    the items at build time (default: all cores from PARALLEL_BUILD_ITEMS items, else
    ``threads``; the build is a one-off at load and dominates it for large catalogues).

    Exclusions over-fetch ``k + max(len(exclude[b]))`` candidates and filter them, which is
    exact for the probed lists and needs no per-row faiss selector (one batched call).

    ``updated`` (copy-on-write, for a new model version) clones the faiss index and moves
    changed vectors / adds new ones to their nearest existing centroid, on ``train_threads``
    threads; :meth:`drift` says how much of the catalogue was placed so since the k-means.
    """

    kind = "ivf"

    def __init__(
        self,
        table: npt.ArrayLike,
        *,
        nlist: int | None = None,
        nprobe: int | None = None,
        min_recall: float | None = None,
        tune_queries: npt.ArrayLike | None = None,
        threads: int = 1,
        train_threads: int | None = None,
        seed: int = 0,
    ) -> None:
        checked = check_table(table)
        self.num_items = len(checked) - 1
        self.dim = checked.shape[1]
        self.nlist = (
            default_nlist(self.num_items)
            if nlist is None
            else positive_int("nlist", nlist, self.num_items)
        )
        self.nprobe = (
            default_nprobe(self.nlist)
            if nprobe is None
            else positive_int("nprobe", nprobe, self.nlist)
        )
        self.threads = positive_int("threads", threads)
        if min_recall is not None and (
            isinstance(min_recall, bool)
            or not isinstance(min_recall, int | float)
            or not 0.0 < min_recall <= 1.0
        ):
            raise ServingError(f"min_recall must be in (0, 1], got {min_recall!r}")
        if train_threads is None:
            big = self.num_items >= PARALLEL_BUILD_ITEMS
            train_threads = max(self.threads, os.cpu_count() or 1) if big else self.threads
        self.train_threads = positive_int("train_threads", train_threads)
        self.moved = 0  # items added or updated since the centroids were trained
        self._lock = threading.Lock()  # faiss may not search while the lists are modified
        self._quantizer = faiss.IndexFlatIP(self.dim)
        self._index = faiss.IndexIVFFlat(
            self._quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT
        )
        # A hashtable direct map makes reconstruct (vectors) and remove_ids (updates) work.
        self._index.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        with omp_threads(self.train_threads):
            self._train(checked[1:], seed)
            self._index.add_with_ids(checked[1:], np.arange(1, self.num_items + 1))
        if min_recall is not None:
            queries = (
                check_queries(tune_queries, self.dim)
                if tune_queries is not None
                else probe_queries(checked, seed)
            )
            self._tune(checked, queries, min_recall, start=1 if nprobe is None else nprobe)

    def _train(self, rows: FloatArray, seed: int) -> None:
        if self.nlist == 1:  # one list holds everything; k-means would only warn about sizes
            self._quantizer.add(rows.mean(axis=0, keepdims=True))
            self._index.is_trained = True
            return
        sample = min(len(rows), TRAIN_POINTS_PER_LIST * self.nlist)
        rng = np.random.default_rng(seed)
        picked = np.sort(rng.choice(len(rows), size=sample, replace=False))
        self._index.cp.seed = seed
        self._index.train(np.ascontiguousarray(rows[picked]))

    def _tune(self, table: FloatArray, queries: FloatArray, min_recall: float, start: int) -> None:
        """Doubles nprobe from ``start`` until recall@10 on ``queries`` reaches min_recall.

        The queries should be real user vectors (the service passes encoded histories):
        perturbed table rows, the fallback, can be far easier than real queries when the item
        vectors have little cluster structure, and then promise a recall serving never sees.
        """
        k = min(RECALL_K, self.num_items)
        truth, _ = exact_search(table, queries, k)

        def search_at(nprobe: int) -> IdArray:
            self.nprobe = nprobe
            return self.search(queries, k)[0]

        self.nprobe, self.recall = tune_nprobe(search_at, truth, self.nlist, min_recall, start)

    def measure_recall(
        self, reference: ItemIndex, queries: npt.ArrayLike, k: int = RECALL_K
    ) -> float:
        """recall@k of this index against ``reference`` (an exact index) on ``queries``."""
        return measure_recall(self, reference, queries, k)

    def memory_bytes(self) -> int:
        """Estimate: list codes + ids, centroids, and ~16 bytes per item for the direct map."""
        items = int(self._index.ntotal)
        return items * (int(self._index.code_size) + 8 + 16) + self.nlist * self.dim * 4

    def _search(
        self, queries: FloatArray, k: int, exclude: list[IdArray]
    ) -> tuple[IdArray, FloatArray]:
        extra = max(len(e) for e in exclude)
        fetch = min(k + extra, self.num_items)
        params = faiss.SearchParametersIVF()  # per call: concurrent searches never race on it
        params.nprobe = self.nprobe
        with self._lock, omp_threads(self.threads):
            scores, labels = self._index.search(queries, fetch, params=params)
        scores[labels < 0] = -np.inf  # faiss pads with label -1 and -FLT_MAX
        labels[labels < 0] = 0
        if extra:
            mask_excluded(labels, scores, exclude, self.num_items)
        return finish(labels, scores, k)

    def _vectors(self, ids: IdArray) -> FloatArray:
        with self._lock:
            rows: FloatArray = self._index.reconstruct_batch(ids)
        return rows

    def _add(self, ids: IdArray, vectors: FloatArray) -> None:
        with self._lock, omp_threads(self.threads):
            old = ids[ids <= self.num_items]
            if len(old):  # an updated row may belong to another list: remove, then re-add
                # The stubs say IDSelector; faiss's wrapper also takes an id array.
                self._index.remove_ids(old)  # type: ignore[arg-type]
            self._index.add_with_ids(vectors, ids)
            self.num_items = int(ids.max(initial=self.num_items))
            self.moved += len(ids)

    def _updated(self, ids: IdArray, vectors: FloatArray) -> IVFIndex:
        clone = copy.copy(self)  # the settings; the faiss index is replaced below
        clone._lock = threading.Lock()
        with self._lock:  # the clone owns copies of the lists, the direct map and the quantizer
            clone._index = cast(faiss.IndexIVFFlat, faiss.clone_index(self._index))
        clone._quantizer = cast(faiss.IndexFlatIP, faiss.downcast_index(clone._index.quantizer))
        # Off the request path (a model load): the assignment to centroids may use every core.
        with omp_threads(self.train_threads):
            old = ids[ids <= self.num_items]
            if len(old):  # remove, then re-add: an updated row may belong to another list
                clone._index.remove_ids(old)  # type: ignore[arg-type]
            clone._index.add_with_ids(vectors, ids)
        clone.num_items = int(ids.max(initial=self.num_items))
        clone.moved = self.moved + len(ids)
        return clone

    def drift(self) -> float:
        return self.moved / max(1, self.num_items)
