"""The exact item index: blocked matmul over every item, optionally on int8 rows."""

from __future__ import annotations

import copy
import threading
from typing import Any

import numpy as np
import numpy.typing as npt

from recloop.errors import ServingError
from recloop.serve.indexes.base import (
    RERANK_MARGIN,
    SCORE_BUDGET,
    BlockScorer,
    FloatArray,
    IdArray,
    ItemIndex,
    blocked_search,
    check_table,
    finish,
    positive_int,
    scores_against,
)


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
