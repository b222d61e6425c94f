"""Raw ids <-> the model's dense ids, and the training history the service starts from.

The HTTP API speaks raw ids (strings, as the product knows them). A model version's vocabulary
(``items.parquet`` in the registry) maps them to dense ids 1..num_items. User state stores raw
item ids, so it survives a retrain that renumbers the catalogue; the history of users known at
training time comes from the prepared dataset (memory-mapped, nothing loaded per user).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl

from recloop.data.dataset import SequenceDataset, Vocabulary
from recloop.errors import DatasetError, ServingError


class ItemCatalog:
    """A model version's item vocabulary: raw id strings <-> dense ids (1..num_items)."""

    def __init__(self, raw_by_id: npt.NDArray[Any]) -> None:
        self.vocabulary = Vocabulary(raw_by_id=raw_by_id, first_id=1)
        # Plain dicts: a request looks up a few dozen ids, where a dict probe (~50 ns) beats a
        # vectorised binary search's call overhead (~10 us) by far. ~100 bytes per item.
        self._raw_strings = [str(raw) for raw in raw_by_id.tolist()]
        self._dense_by_raw = {raw: i for i, raw in enumerate(self._raw_strings, start=1)}

    @classmethod
    def from_parquet(cls, path: Path) -> ItemCatalog:
        try:
            table = pl.read_parquet(path)
        except Exception as exc:  # polars raises several types for unreadable files
            raise ServingError(f"{path}: cannot read the item vocabulary ({exc})") from None
        if "raw" not in table.columns or "id" not in table.columns:
            raise ServingError(f"{path}: item vocabulary needs columns id and raw")
        ids = table["id"].to_numpy()
        if len(ids) and not np.array_equal(ids, np.arange(1, len(ids) + 1)):
            raise ServingError(f"{path}: item ids are not 1..{len(ids)} in order")
        return cls(table["raw"].to_numpy())

    @property
    def num_items(self) -> int:
        return len(self._raw_strings)

    def to_dense(self, raw_ids: Sequence[str]) -> tuple[npt.NDArray[np.int64], list[str]]:
        """(dense ids of the known raw ids, in order; the unknown raw ids, in order)."""
        lookup = self._dense_by_raw.get
        dense = [lookup(raw, 0) for raw in raw_ids]
        if 0 not in dense:
            return np.array(dense, dtype=np.int64), []
        unknown = [raw for raw, i in zip(raw_ids, dense, strict=True) if i == 0]
        return np.array([i for i in dense if i], dtype=np.int64), unknown

    def to_raw(self, ids: npt.NDArray[np.int64]) -> list[str]:
        strings = self._raw_strings
        return [strings[i - 1] for i in ids.tolist()]


class UserHistory:
    """Training-time sequences of a prepared dataset, mapped into one model's item ids."""

    def __init__(self, dataset: SequenceDataset, catalog: ItemCatalog) -> None:
        self.dataset = dataset
        raw_users = dataset.users.raw_by_id.tolist()
        self._user_index = {str(raw): i for i, raw in enumerate(raw_users)}
        # Plain ndarray views of the memory-maps: np.memmap's per-slice bookkeeping costs more
        # than the slice itself on this path.
        self._offsets = np.array(dataset.sequences.offsets, dtype=np.int64)
        self._items = np.asarray(dataset.sequences.items).view(np.ndarray)
        # dataset dense id -> model dense id (0 where the model does not know the item).
        raw_items = dataset.items.raw_by_id
        mapping = catalog.vocabulary.to_dense(raw_items, missing=0)
        self._to_model = np.concatenate([[0], mapping]).astype(np.int64)

    @classmethod
    def open(cls, directory: Path, catalog: ItemCatalog) -> UserHistory:
        try:
            return cls(SequenceDataset(directory), catalog)
        except DatasetError as exc:
            raise ServingError(f"user history: {exc}") from None

    def user_index(self, user_id: str) -> int | None:
        return self._user_index.get(user_id)

    def items(self, user_id: str) -> npt.NDArray[np.int64]:
        """The user's whole training sequence in model ids (unknown items removed)."""
        user = self.user_index(user_id)
        if user is None:
            return np.zeros(0, dtype=np.int64)
        return self.user_items(user)

    def user_items(self, user: int) -> npt.NDArray[np.int64]:
        """The training sequence of dense user `user`, in model ids."""
        rows = self._items[self._offsets[user] : self._offsets[user + 1]]
        mapped = self._to_model[rows]
        return mapped[mapped > 0]

    def item_counts(self, num_items: int) -> npt.NDArray[np.int64]:
        """Interactions per model item id over the whole dataset (popularity fallback)."""
        mapped = self._to_model[np.asarray(self.dataset.sequences.items, dtype=np.int64)]
        return np.bincount(mapped, minlength=num_items + 1).astype(np.int64)
