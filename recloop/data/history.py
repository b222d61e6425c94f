"""Users' training-time sequences, in one model's item ids: where serving's and the online
learner's per-user histories start.

User state (serving) and the learner store raw item ids or a model's dense ids; a model's
vocabulary may differ from the dataset's (an online-grown one appends items, a retrain
renumbers them), so the dataset's item ids are mapped once, by raw id, into the model's. The
sequences themselves stay memory-mapped: nothing is loaded per user.
"""

from __future__ import annotations

import copy as _copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from recloop.data.dataset import SequenceDataset
from recloop.data.vocabulary import Vocabulary


class UserHistory:
    """The sequences of a prepared dataset, mapped into the item ids of vocabulary `items`."""

    def __init__(self, dataset: SequenceDataset, items: Vocabulary) -> None:
        self.dataset = dataset
        self.users: Vocabulary = dataset.users.index_text()  # raw user id <-> row 0..U-1
        # Plain ndarray views of the memory-maps: np.memmap's per-slice bookkeeping costs more
        # than the slice itself on this path.
        self._offsets = np.array(dataset.sequences.offsets, dtype=np.int64)
        self._items = np.asarray(dataset.sequences.items).view(np.ndarray)
        # dataset dense id -> model dense id (0, the padding id, where the model lacks the item)
        self._to_model = np.concatenate([[0], items.translate(dataset.items)]).astype(np.int64)

    @classmethod
    def open(cls, directory: Path, items: Vocabulary) -> UserHistory:
        """The dataset at `directory` (DatasetError when it is not a readable one)."""
        return cls(SequenceDataset(directory), items)

    def remapped(self, replaced: Mapping[int, str], *, copy: bool = True) -> UserHistory:
        """This history after model ids `replaced` (model id -> raw id) changed meaning (a
        bounded online table reused their rows): entries of the items that held them are
        dropped and the new items, where the dataset has them, map to their ids, as a history
        opened with the new vocabulary would. `copy` False changes this one in place."""
        history = _copy.copy(self) if copy else self
        history._to_model = self._to_model.copy() if copy else self._to_model
        ids = np.fromiter(replaced, dtype=np.int64, count=len(replaced))
        history._to_model[np.isin(history._to_model, ids)] = 0
        for model_id, raw in replaced.items():
            row = self.dataset.items.dense(raw)
            if row != self.dataset.items.missing_id:
                history._to_model[row] = model_id
        return history

    def forget(self, model_ids: Sequence[int]) -> None:
        """Drops the entries of model ids `model_ids` (in place), mapping nothing new."""
        ids = np.asarray(model_ids, dtype=np.int64)
        self._to_model[np.isin(self._to_model, ids)] = 0

    @property
    def num_users(self) -> int:
        return len(self.users)

    def user_index(self, user_id: str) -> int | None:
        index = self.users.dense(user_id)
        return None if index == self.users.missing_id else index

    def items(self, user_id: str) -> npt.NDArray[np.int64]:
        """The user's whole training sequence in model ids (unknown items removed; empty for
        a user the dataset does not have)."""
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
