"""Bounded item tables: which rows may be evicted, and when a dense id changed meaning.

With `online.max_items`, the item table stops growing at that many rows. While it has room a
newly admitted item is appended, as before; once it is full the admitted item takes a row
(a *slot*) chosen by :meth:`ItemSlots.victim`: the least recently seen ("lru") or the one
with the lowest time-decayed frequency ("decayed"). Rows seen in the last `ttl` events, and
rows seen in the micro-batch being processed, are never chosen. The slot is then a *remap*:
dense id `slot` means a different raw id from that event on. The delta the learner publishes
says so (the registry's remapped-items side file), and serving follows it.

Time is the event offset. Every slot keeps when it was last seen, its decayed frequency and
`epoch`, the offset at which its current item took it: an entry of a dense sequence appended
before its slot's epoch points at an evicted item. :meth:`ItemSlots.clean` drops those from a
user's sequence lazily, when the sequence is next used (see its docstring), so an eviction
costs O(1) however many users held the evicted item.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

EvictPolicy = Literal["lru", "decayed"]


def decay(half_life: float, elapsed: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The factor a count decays by over `elapsed` events."""
    return np.exp2(-np.asarray(elapsed, dtype=np.float64) / half_life)


class ItemSlots:
    """Per-row recency, decayed frequency and epoch of an item table of `capacity` rows
    (dense ids 1..capacity; row 0 is padding)."""

    def __init__(self, capacity: int, policy: EvictPolicy, ttl: int, half_life: float) -> None:
        self.capacity = capacity
        self.policy = policy
        self.ttl = ttl
        self.half_life = half_life
        self.last_seen = np.full(capacity + 1, -1, dtype=np.int64)  # [C + 1] offsets
        self.frequency = np.zeros(capacity + 1, dtype=np.float64)  # decayed, as of last_seen
        self.epoch = np.zeros(capacity + 1, dtype=np.int64)  # offset its item took the slot
        self.latest_epoch = 0  # the newest epoch of any slot: nothing to clean before it

    def touch(self, slot: int, offset: int) -> None:
        """`slot`'s item occurred at `offset`."""
        last = self.last_seen[slot]
        kept = float(decay(self.half_life, offset - last)) if last >= 0 else 0.0
        self.frequency[slot] = self.frequency[slot] * kept + 1.0
        self.last_seen[slot] = offset

    def assign(self, slot: int, offset: int) -> None:
        """A newly admitted item takes `slot` at `offset` (never seen yet: its admitting
        occurrence is then counted by :meth:`touch`, as every later one)."""
        self.last_seen[slot] = -1
        self.frequency[slot] = 0.0
        self.epoch[slot] = offset
        self.latest_epoch = max(self.latest_epoch, offset)

    def victim(self, used: int, now: int, protect_from: int) -> int | None:
        """The slot among 1..`used` to evict at offset `now`, or None when every row was seen
        at or after `protect_from` (the micro-batch) or within the last `ttl` events."""
        last = self.last_seen[1 : used + 1]
        cutoff = min(protect_from, now - self.ttl) if self.ttl else protect_from
        allowed = last < cutoff
        if not allowed.any():
            return None
        if self.policy == "lru":
            score = last.astype(np.float64)
        else:
            score = self.frequency[1 : used + 1] * decay(self.half_life, now - last)
        score = np.where(allowed, score, np.inf)
        return int(np.argmin(score)) + 1  # ties: the lowest dense id

    def clean(self, sequence: list[int], checked: int) -> None:
        """Drops in place the entries of `sequence` whose slot changed meaning after
        `checked`, the offset the sequence was last cleaned at (or built, when it is new).

        Exact when every use of a sequence cleans it first: an entry appended at or before
        `checked` was valid then, so it is stale now iff its slot was reassigned since."""
        if self.latest_epoch <= checked or not sequence:
            return
        ids = np.asarray(sequence, dtype=np.int64)
        keep = self.epoch[ids] <= checked
        if not keep.all():
            sequence[:] = ids[keep].tolist()

    def reset_epochs(self, slots: Sequence[int], offsets: Sequence[int]) -> None:
        """Epochs of slots whose items were admitted online (a restart rebuilds them)."""
        for slot, offset in zip(slots, offsets, strict=True):
            self.epoch[slot] = offset
        self.latest_epoch = int(self.epoch.max(initial=0))
