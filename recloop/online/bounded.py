"""The online learner's bounded item table (`online.max_items`): what happens when an admitted
item takes the row of an evicted one, and keeping the dense user histories right after it.

The learner calls in at three places: :meth:`BoundedTable.slot_for` when an item is due for
admission (append while there is room, else the victim's slot, else None: the item waits),
:meth:`BoundedTable.reuse` to re-initialise that row like an admission (embedding, optimizer
moments, counts, the vocabulary entry), and :meth:`BoundedTable.clean` each time a user's
dense sequence is used. What was remapped since the last publish goes into the next delta
(:attr:`BoundedTable.remapped`); see recloop.online.slots for the policies.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from recloop.data.history import UserHistory
from recloop.data.vocabulary import Vocabulary
from recloop.errors import ConfigError
from recloop.online.config import OnlineConfig
from recloop.online.resume import OnlineState
from recloop.online.slots import ItemSlots
from recloop.registry import Manifest

log = logging.getLogger("recloop.online")


def table_bound(config: OnlineConfig, origin: Manifest) -> int | None:
    """online.max_items, or the origin's train.max_items when that is unset."""
    if config.max_items is not None:
        return config.max_items
    trained = ((origin.training.get("config") or {}).get("train") or {}).get("max_items")
    return int(trained) if isinstance(trained, int) and not isinstance(trained, bool) else None


class BoundedTable:
    """The slots of a table of at most `capacity` items, and its remaps since a publish."""

    def __init__(
        self,
        config: OnlineConfig,
        capacity: int,
        version: str,
        vocabulary: Vocabulary,
        base: UserHistory | None,
    ) -> None:
        items = vocabulary.num_items
        if items > capacity:
            raise ConfigError(
                f"online.max_items = {capacity} is smaller than the {items} items version "
                f"{version} already has: the learner evicts rows only to make room for new "
                f"items and never shrinks a table; raise online.max_items to at least {items} "
                "or start from a version with fewer items"
            )
        if config.sharding != "none":  # OnlineConfig checks it too; max_items may be inherited
            raise ConfigError("max_items is single-process only: unset online.sharding")
        self.capacity = capacity
        self.vocabulary = vocabulary  # the learner's: reuse() renames its rows
        self.base = base  # the learner's training histories: reuse() drops the evicted items
        self.slots = ItemSlots(capacity, config.evict, config.evict_ttl, config.decay_half_life)
        self.remapped: dict[int, str] = {}  # dense id -> its new raw id, since the last publish
        self.evictions = 0
        self.batch_start = 0  # rows seen from this offset on are never evicted
        self._checked: dict[str, int] = {}  # user -> offset their sequence was last cleaned

    def resume(self, admitted: Mapping[str, int]) -> None:
        """After a restart: the epochs of the rows admitted online (when they took their
        slot), and the training histories without them (the live learner dropped their slots'
        older items at each reuse, and a readmitted dataset item was new then)."""
        slots = [self.vocabulary.dense(raw) for raw in admitted]
        self.slots.reset_epochs(slots, list(admitted.values()))
        if self.base is not None and slots:
            self.base.forget(slots)

    def clean(self, user: str, sequence: list[int], now: int) -> None:
        """Drops the entries of `sequence` whose rows changed meaning since it was last used."""
        self.slots.clean(sequence, self._checked.get(user, now))
        self._checked[user] = now

    def slot_for(self, used: int, now: int) -> int | None:
        """Where an item admitted at `now` goes: `used` + 1 (appended) while the table has
        room, else the evicted row, else None (every row is protected: it stays pending)."""
        if used < self.capacity:
            return used + 1
        return self.slots.victim(used, now, self.batch_start)

    def reuse(
        self,
        slot: int,
        raw: str,
        row: torch.Tensor,
        offset: int,
        table: torch.nn.Parameter,
        optimizer: torch.optim.Optimizer,
        counts: np.ndarray,
        state: OnlineState,
    ) -> str:
        """Gives row `slot` to the new item `raw`, admitted at `offset`, with embedding `row`
        [D], fresh optimizer moments and no count; returns the evicted raw id."""
        evicted = self.vocabulary.replace(slot, raw)
        with torch.no_grad():
            table[slot] = row
        moments: dict[str, Any] = optimizer.state.get(table, {})
        for value in moments.values():
            if isinstance(value, torch.Tensor) and value.shape == table.shape:
                value[slot] = 0.0
        counts[slot] = 0
        if self.base is not None:
            self.base.forget([slot])
        state.admitted.pop(evicted, None)
        state.admitted[raw] = offset
        self.slots.assign(slot, offset)
        self.remapped[slot] = raw
        self.evictions += 1
        log.debug("evicted %r from row %d for %r", evicted, slot, raw)
        return evicted
