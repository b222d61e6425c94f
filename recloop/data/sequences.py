"""Per-user interaction sequences in CSR form: the in-memory shape every stage reads.

User ``u`` (dense id, 0-based) owns ``items[offsets[u]:offsets[u + 1]]``, in time order.
Item ids are dense and 1-based: 0 is reserved for padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from recloop.errors import DatasetError

PADDING_ID = 0


@dataclass(frozen=True)
class Sequences:
    offsets: npt.NDArray[np.int64]  # [U + 1], offsets[0] == 0, non-decreasing
    items: npt.NDArray[np.int32]  # [E], dense item ids in 1..num_items
    timestamps: npt.NDArray[np.int64]  # [E], non-decreasing within each user

    def __post_init__(self) -> None:
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or int(self.offsets[0]) != 0:
            raise DatasetError("offsets must be a 1-D array starting at 0")
        if int(self.offsets[-1]) != len(self.items) or len(self.items) != len(self.timestamps):
            raise DatasetError(
                f"CSR arrays disagree: offsets end at {int(self.offsets[-1])}, "
                f"items has {len(self.items)}, timestamps has {len(self.timestamps)}"
            )

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_events(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> npt.NDArray[np.int64]:
        return np.diff(self.offsets)

    def user_items(self, user: int) -> npt.NDArray[np.int32]:
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def user_timestamps(self, user: int) -> npt.NDArray[np.int64]:
        return self.timestamps[self.offsets[user] : self.offsets[user + 1]]

    def user_of_event(self) -> npt.NDArray[np.int64]:
        """Dense user id of every event, [E] (vectorised inverse of the offsets)."""
        return np.repeat(np.arange(self.num_users, dtype=np.int64), self.lengths)

    @classmethod
    def from_lengths(
        cls,
        lengths: npt.NDArray[np.integer],
        items: npt.NDArray[np.integer],
        timestamps: npt.NDArray[np.integer],
    ) -> Sequences:
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(
            offsets=offsets,
            items=np.ascontiguousarray(items, dtype=np.int32),
            timestamps=np.ascontiguousarray(timestamps, dtype=np.int64),
        )
