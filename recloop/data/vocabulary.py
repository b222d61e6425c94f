"""Raw ids <-> dense ids: the one vocabulary type of the dataset, serving and the online learner.

A vocabulary file is a parquet table of (id, raw) rows, row i holding dense id first_id + i
(users: 0.., items: 1.., 0 being the padding id). `recloop prepare` writes the raw ids in
ascending order; a vocabulary the online learner grew has its new ids appended at the end, so
existing dense ids never change. The registry copies these files into versions as they are.

Two ways in, because the callers want different things:

- numpy, typed as in the file (dataset readers, evaluation): :meth:`Vocabulary.to_dense` and
  :meth:`Vocabulary.to_raw`, vectorised (a binary search over the sorted raw ids);
- text, as the HTTP API and the event log speak raw ids (serving, the online learner):
  :meth:`Vocabulary.dense`, :meth:`Vocabulary.lookup` and :meth:`Vocabulary.raw_strings`, a
  dict probe each (a request looks up a few dozen ids, where a dict probe, ~50 ns, beats a
  vectorised search's call overhead, ~10 us). The dict and the strings are built on first use
  or by :meth:`Vocabulary.index_text` (serving builds them at load, not in the first request).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt
import polars as pl

from recloop.errors import DatasetError


class Vocabulary:
    """Dense ids first_id..first_id + len - 1 <-> raw ids; grows only at the end (:meth:`add`).

    An id not in the vocabulary reads as :attr:`missing_id` (first_id - 1) in the text lookups:
    for items that is 0, the padding id, which no item has.
    """

    def __init__(
        self,
        raw_by_id: pl.Series | npt.NDArray[Any] | Sequence[Any],
        first_id: int = 1,
        source: str = "vocabulary",
    ) -> None:
        """``raw_by_id``: the raw id of dense id first_id, first_id + 1, ... (typed: integers
        stay integers); ``source``: where it came from, for error messages (the file)."""
        self.first_id = first_id
        self.source = source
        column = raw_by_id if isinstance(raw_by_id, pl.Series) else pl.Series(raw_by_id)
        self._column = column.rename("raw")  # typed, as in the file
        self._added: list[str] = []  # raw ids added since (text; see raw_by_id for the type)
        self._replaced: dict[int, str] = {}  # row of _column -> its new raw id (see replace)
        self._typed: npt.NDArray[Any] | None = None
        self._sorted: tuple[npt.NDArray[Any], npt.NDArray[np.int64]] | None = None
        self._strings: npt.NDArray[np.object_] | None = None
        self._dense_by_raw: dict[str, int] | None = None

    @classmethod
    def read(cls, path: Path, first_id: int = 1) -> Vocabulary:
        """The vocabulary file at ``path``, checked: DatasetError naming the file and the row
        when it is unreadable, lacks the id or raw column, or has ids out of order or a missing
        raw id; a raw id twice is found (and named) when the lookups are built: checking it here
        would cost a hash of every id (~1 s per 1M ids) that the lookups do anyway."""
        return cls(_read_column(Path(path), first_id), first_id, str(path))

    @classmethod
    def from_strings(cls, raw_ids: Sequence[str], first_id: int = 1) -> Vocabulary:
        return cls(pl.Series("raw", list(raw_ids), dtype=pl.Utf8), first_id)

    # ------------------------------------------------------------------ size

    def __len__(self) -> int:
        return len(self._column) + len(self._added)

    @property
    def num_items(self) -> int:
        """len(self), under the name that reads right where this is the item catalogue."""
        return len(self)

    @property
    def last_id(self) -> int:
        return self.first_id + len(self) - 1

    @property
    def missing_id(self) -> int:
        """What the text lookups answer for a raw id not in the vocabulary."""
        return self.first_id - 1

    # ------------------------------------------------------------------ numpy, typed

    @property
    def raw_by_id(self) -> npt.NDArray[Any]:
        """[N] raw id of dense id first_id + i, typed as the file would store it (text ids are
        an object array of str)."""
        if self._typed is None:
            self._typed = _to_numpy(self.column())
        return self._typed

    def to_raw(self, ids: npt.ArrayLike) -> npt.NDArray[Any]:
        index = np.asarray(ids, dtype=np.int64) - self.first_id
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise DatasetError(
                f"{self.source}: dense id out of range [{self.first_id}, {self.last_id}]"
            )
        return self.raw_by_id[index]

    def to_dense(self, raw: npt.ArrayLike, missing: int = -1) -> npt.NDArray[np.int64]:
        """Dense ids of `raw` ids (typed as the vocabulary's); `missing` where a raw id is not
        in the vocabulary."""
        keys, ids = self._sorted_keys()
        query = np.asarray(raw, dtype=keys.dtype)
        pos = np.clip(np.searchsorted(keys, query), 0, max(len(keys) - 1, 0))
        found = keys[pos] == query if len(keys) else np.zeros(query.shape, dtype=bool)
        return np.where(found, ids[pos], missing)

    def translate(self, other: Vocabulary) -> npt.NDArray[np.int64]:
        """[len(other)] this vocabulary's dense id of each of `other`'s raw ids, compared as
        text (an online-grown vocabulary may hold text ids beside a dataset's integers);
        missing_id where this vocabulary does not have one."""
        mine, theirs = self.raw_by_id, other.raw_by_id
        if mine.dtype.kind in "iu" and theirs.dtype.kind in "iu":  # integers: vectorised
            return self.to_dense(theirs.astype(np.int64), missing=self.missing_id)
        lookup, missing = self._text_index().get, self.missing_id
        return np.array([lookup(raw, missing) for raw in other.strings().tolist()], np.int64)

    def _sorted_keys(self) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
        if self._sorted is None:
            # `recloop prepare` assigns ids in ascending raw order, so this is usually the
            # identity; sorting keeps lookups right for any vocabulary (a grown one, too).
            order = np.argsort(self.raw_by_id, kind="stable")
            keys = self.raw_by_id[order]
            if len(keys) > 1 and bool(np.any(keys[1:] == keys[:-1])):
                self._raise_repeated()
            self._sorted = keys, order.astype(np.int64) + self.first_id
        return self._sorted

    def _raise_repeated(self) -> NoReturn:
        first_row: dict[str, int] = {}
        for row, raw in enumerate(self.strings().tolist(), start=1):
            if raw in first_row:
                raise DatasetError(
                    f"{self.source}: rows {first_row[raw]} and {row} hold the same raw id {raw!r}"
                )
            first_row[raw] = row
        raise DatasetError(f"{self.source}: a raw id appears twice")  # typed, not as text

    # ------------------------------------------------------------------ text

    def index_text(self) -> Vocabulary:
        """Builds the text lookups now (~1 s per 1M ids) rather than on first use."""
        self._text_index()
        return self

    def dense(self, raw: str) -> int:
        """The dense id of one raw id, missing_id (items: 0) when it is not in the vocabulary."""
        return self._text_index().get(raw, self.missing_id)

    def lookup(self, raw_ids: Sequence[str]) -> tuple[npt.NDArray[np.int64], list[str]]:
        """(dense ids of the known raw ids, in order; the unknown raw ids, in order)."""
        lookup, missing = self._text_index().get, self.missing_id
        dense = [lookup(raw, missing) for raw in raw_ids]
        if missing not in dense:
            return np.array(dense, dtype=np.int64), []
        unknown = [raw for raw, i in zip(raw_ids, dense, strict=True) if i == missing]
        return np.array([i for i in dense if i != missing], dtype=np.int64), unknown

    def raw(self, dense: int) -> str:
        return str(self.strings()[dense - self.first_id])

    def raw_strings(self, ids: npt.ArrayLike) -> list[str]:
        """The raw ids (text) of dense ids `ids`."""
        index = np.asarray(ids, dtype=np.int64) - self.first_id
        strings: list[str] = self.strings()[index].tolist()
        return strings

    def strings(self) -> npt.NDArray[np.object_]:
        """[N] raw ids as text. An object array, not a list: the cyclic GC does not walk it
        (nor a dict of str -> int), where a list of 1M strings costs ~40 ms in every full
        collection."""
        if self._strings is None:
            self._strings = _as_strings(self._column)
            if self._replaced:
                self._strings = self._strings.copy()
                for row, raw in self._replaced.items():
                    self._strings[row] = raw
        if len(self._strings) != len(self):  # ids were added since
            base = self._strings[: len(self._column)]
            self._strings = np.concatenate([base, np.array(self._added, dtype=object)])
        return self._strings

    def _text_index(self) -> dict[str, int]:
        if self._dense_by_raw is None:
            strings = self.strings().tolist()
            index = {raw: i for i, raw in enumerate(strings, start=self.first_id)}
            if len(index) != len(strings):
                self._raise_repeated()
            self._dense_by_raw = index
        return self._dense_by_raw

    # ------------------------------------------------------------------ growth

    def add(self, raw: str) -> int:
        """Appends `raw` (online learning) and returns its dense id."""
        index = self._text_index()
        if raw in index:
            raise DatasetError(f"item {raw!r} is already in the vocabulary")
        self._added.append(raw)
        index[raw] = self.last_id
        self._typed = self._sorted = None
        return self.last_id

    def replace(self, dense: int, raw: str) -> str:
        """Gives dense id `dense` to the new raw id `raw` (a bounded online table reusing the
        row of an evicted item) and returns the raw id it had."""
        index = self._text_index()
        if raw in index:
            raise DatasetError(f"item {raw!r} is already in the vocabulary")
        row = dense - self.first_id
        old = self.raw(dense)
        del index[old]
        index[raw] = dense
        if row < len(self._column):
            if not self._replaced:  # the first change: our own copy of the strings
                self._strings = self.strings().copy()
            self._replaced[row] = raw
        else:
            self._added[row - len(self._column)] = raw
        self.strings()[row] = raw
        self._typed = self._sorted = None
        return old

    def extended(self, path: Path, replaced: Mapping[int, str] | None = None) -> Vocabulary:
        """The vocabulary of a newer file that appends ids to this one (online learning): this
        one's text lookups are copied and only the new ids are added, several times faster
        than reading from scratch (1M items: 0.3 s vs 1.3 s); this vocabulary is not changed.
        DatasetError when the file does not start with this vocabulary's ids in order.

        `replaced` (dense id -> raw id): ids of this vocabulary that the newer file gives to
        other raw ids (a bounded online table reused their rows); checked like the rest."""
        column = _read_column(Path(path), self.first_id)
        known = len(self)
        if len(column) < known or not self._starts(column.head(known), replaced or {}):
            raise DatasetError(
                f"{path}: the vocabulary does not start with the {known} ids of the current "
                "one in order (with the remapped ids replaced); the ids were renumbered"
            )
        grown = copy.copy(self)
        grown.source = str(path)
        grown._column, grown._added = column, []
        grown._typed = grown._sorted = None
        added = _as_strings(column.slice(known))
        grown._strings = np.concatenate([self.strings(), added])
        for dense, raw in (replaced or {}).items():
            grown._strings[dense - self.first_id] = raw
        grown._replaced = {}
        if self._dense_by_raw is not None:
            grown._dense_by_raw = self._dense_by_raw.copy()
            for dense in replaced or {}:  # all old ids first: one may come back elsewhere
                grown._dense_by_raw.pop(str(self.strings()[dense - self.first_id]), None)
            grown._dense_by_raw.update({raw: dense for dense, raw in (replaced or {}).items()})
            start = self.first_id + known
            grown._dense_by_raw.update({raw: start + i for i, raw in enumerate(added.tolist())})
            if len(grown._dense_by_raw) != len(grown):
                grown._raise_repeated()
        return grown

    def _starts(self, head: pl.Series, replaced: Mapping[int, str]) -> bool:
        """Whether `head` (a file's first len(self) raw ids) holds this vocabulary's ids in
        order, with the ids in `replaced` given their new raw ids."""
        if not replaced:
            ours = self.column()
            if head.dtype != ours.dtype:  # e.g. integer raw ids turned text by a non-number
                head, ours = head.cast(pl.Utf8), ours.cast(pl.Utf8)
            return bool(head.equals(ours))
        expected = self.strings().copy()
        for dense, raw in replaced.items():
            if not self.first_id <= dense <= self.last_id:
                return False
            expected[dense - self.first_id] = raw
        return bool(np.array_equal(_as_strings(head), expected))

    # ------------------------------------------------------------------ writing

    def column(self) -> pl.Series:
        """The ``raw`` column as a file stores it. Added raw ids keep the column's type while
        every one parses as it (integer catalogues stay integer); otherwise it becomes text."""
        if not self._added and not self._replaced:
            return self._column
        raw = pl.Series("raw", self.strings().tolist(), dtype=pl.Utf8)
        if self._column.dtype != pl.Utf8:
            with contextlib.suppress(pl.exceptions.InvalidOperationError):
                raw = raw.cast(self._column.dtype, strict=True)
        return raw

    def table(self) -> pl.DataFrame:
        ids = pl.int_range(self.first_id, self.first_id + len(self), eager=True, dtype=pl.Int64)
        return pl.DataFrame([ids.rename("id"), self.column()])

    def write(self, path: Path) -> None:
        self.table().write_parquet(path)

    def parquet_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.table().write_parquet(buffer)
        return buffer.getvalue()


def _read_column(path: Path, first_id: int) -> pl.Series:
    """The checked ``raw`` column of a vocabulary file."""
    try:
        table = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DatasetError(f"{path}: not a readable vocabulary table ({exc})") from exc
    missing = [name for name in ("id", "raw") if name not in table.columns]
    if missing:
        raise DatasetError(f"{path}: the vocabulary table has no {' or '.join(missing)} column")
    ids, raw = table["id"], table["raw"]
    expected = np.arange(first_id, first_id + len(ids))
    got = ids.to_numpy()
    if got.dtype.kind not in "iu" or not np.array_equal(got, expected):
        row = int(np.flatnonzero(got != expected)[0]) if got.dtype.kind in "iuf" else 0
        raise DatasetError(
            f"{path}: row {row + 1} has id {ids[row]}, expected {first_id + row} "
            f"(ids are {first_id}..{first_id + len(ids) - 1} in order)"
        )
    if raw.null_count():
        row = int(np.flatnonzero(raw.is_null().to_numpy())[0])
        raise DatasetError(f"{path}: row {row + 1} (id {first_id + row}) has no raw id")
    return raw


def _to_numpy(column: pl.Series) -> npt.NDArray[Any]:
    if column.dtype == pl.Utf8:
        return np.asarray(column.to_list(), dtype=object)
    return column.to_numpy()


def _as_strings(column: pl.Series) -> npt.NDArray[np.object_]:
    if column.dtype == pl.Utf8:
        return column.to_numpy()  # already str objects
    return np.array([str(raw) for raw in column.to_list()], dtype=object)
