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
from typing import Any

import numpy as np
import torch

from recloop.data.history import UserHistory
from recloop.data.vocabulary import Vocabulary
from recloop.errors import ConfigError
from recloop.models.base import SequentialEncoder
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


def bounded_table(
    config: OnlineConfig,
    origin: Manifest,
    vocabulary: Vocabulary,
    base: UserHistory | None,
    state: OnlineState,
) -> ItemTable:
    """The learner's table policy: bounded (resumed from its published `state`) or not, the
    default; ConfigError when it already has more items than the bound."""
    bound = table_bound(config, origin)
    if bound is None:
        return ItemTable()
    table = BoundedTable(config, bound, vocabulary, base)
    table.resume(state)
    return table


class ItemTable:
    """A table that grows without bound (the default): every admitted item is appended and
    nothing is ever evicted or remapped, so every hook is a no-op."""

    bounded = False

    def __init__(self) -> None:
        self.remapped: dict[int, str] = {}  # dense id -> its new raw id, since the last publish
        self.evictions = 0
        self.forgotten = 0  # evicted items that had been admitted online (no longer in state)
        self.batch_start = 0  # rows seen from this offset on are never evicted

    def clean(self, user: str, sequence: list[int], now: int) -> None:
        """Drops the entries of `sequence` whose rows changed meaning since it was last used."""

    def touch(self, slot: int, offset: int) -> None:
        """`slot`'s item occurred at `offset`."""

    def assign(self, slot: int, offset: int) -> None:
        """A newly admitted item took `slot` at `offset`."""

    def slot_for(self, used: int, now: int) -> int | None:
        """Where an item admitted at `now` goes (None: nowhere yet, it stays pending)."""
        return used + 1


class BoundedTable(ItemTable):
    """The slots of a table of at most `capacity` items, and its remaps since a publish."""

    bounded = True

    def __init__(
        self,
        config: OnlineConfig,
        capacity: int,
        vocabulary: Vocabulary,
        base: UserHistory | None,
    ) -> None:
        items = vocabulary.num_items
        if items > capacity:
            raise ConfigError(
                f"online.max_items = {capacity} is smaller than the {items} items the learner "
                "starts with: it evicts rows only to make room for new items and never "
                f"shrinks a table; raise online.max_items to at least {items} or start from "
                "a version with fewer items"
            )
        if config.sharding != "none":  # OnlineConfig checks it too; max_items may be inherited
            raise ConfigError("max_items is single-process only: unset online.sharding")
        super().__init__()
        self.capacity = capacity
        self.vocabulary = vocabulary  # the learner's: reuse() renames its rows
        self.base = base  # the learner's training histories: reuse() drops the evicted items
        self.slots = ItemSlots(capacity, config.evict, config.evict_ttl, config.decay_half_life)
        self._checked: dict[str, int] = {}  # user -> offset their sequence was last cleaned
        self.state = OnlineState(config.consumer, "", 0)  # the learner's (see resume)

    def resume(self, state: OnlineState) -> None:
        """After a restart: the epochs of the rows admitted online (when they took their
        slot), and the training histories without them (the live learner dropped their slots'
        older items at each reuse, and a readmitted dataset item was new then)."""
        self.state = state
        slots = [self.vocabulary.dense(raw) for raw in state.admitted]
        self.slots.reset_epochs(slots, list(state.admitted.values()))
        if self.base is not None and slots:
            self.base.forget(slots)

    def clean(self, user: str, sequence: list[int], now: int) -> None:
        self.slots.clean(sequence, self._checked.get(user, now))
        self._checked[user] = now

    def touch(self, slot: int, offset: int) -> None:
        self.slots.touch(slot, offset)

    def assign(self, slot: int, offset: int) -> None:
        self.slots.assign(slot, offset)

    def slot_for(self, used: int, now: int) -> int | None:
        """`used` + 1 (appended) while the table has room, else the evicted row, else None
        (every row is protected: the item stays pending)."""
        if used < self.capacity:
            return used + 1
        return self.slots.victim(used, now, self.batch_start)

    def reuse(
        self,
        slot: int,
        raw: str,
        row: torch.Tensor,
        offset: int,
        model: SequentialEncoder,
        optimizer: torch.optim.Optimizer,
        counts: np.ndarray,
    ) -> str:
        """Gives row `slot` to the new item `raw`, admitted at `offset`, with embedding `row`
        [D], fresh optimizer moments and no count; returns the evicted raw id."""
        evicted = self.vocabulary.replace(slot, raw)
        table = model.item_embedding.weight
        with torch.no_grad():
            table[slot] = row
        moments: dict[str, Any] = optimizer.state.get(table, {})
        for value in moments.values():
            if isinstance(value, torch.Tensor) and value.shape == table.shape:
                value[slot] = 0.0
        counts[slot] = 0
        if self.base is not None:
            self.base.forget([slot])
        if self.state.admitted.pop(evicted, None) is not None:
            self.forgotten += 1
        self.state.admitted[raw] = offset
        self.slots.assign(slot, offset)
        self.remapped[slot] = raw
        self.evictions += 1
        log.debug("evicted %r from row %d for %r", evicted, slot, raw)
        return evicted
