"""New items in the online loop: admission into the growing vocabulary, and first embeddings.

An item id the model does not know is counted; after `admit_after` occurrences it joins the
vocabulary with the next dense id (existing ids never change, so deltas and serving caches stay
valid) and its embedding row is initialised from what is known about it: the mean of the items
it co-occurred with (the users' recent items when it appeared), or of the known items that share
its attributes when an attribute file is given. Training then refines the row like any other.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from recloop.data.attributes import read_item_attributes
from recloop.data.vocabulary import Vocabulary

MAX_CONTEXT = 64  # co-occurring item ids kept per pending item (a bounded, recent sample)


@dataclass
class PendingItems:
    """Occurrences of items not yet in the vocabulary, with the items they co-occurred with."""

    admit_after: int
    counts: Counter[str] = field(default_factory=Counter)
    contexts: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def observe(self, raw: str, context: Sequence[int]) -> bool:
        """Counts one occurrence; True when `raw` has now occurred `admit_after` times."""
        self.counts[raw] += 1
        kept = self.contexts[raw]
        kept.extend(int(i) for i in context)
        del kept[:-MAX_CONTEXT]
        return self.counts[raw] >= self.admit_after

    def admit(self, raw: str) -> list[int]:
        """Forgets `raw` and returns its co-occurring dense ids."""
        self.counts.pop(raw, None)
        return self.contexts.pop(raw, [])

    def __len__(self) -> int:
        return len(self.counts)


class ItemAttributes:
    """Raw item id -> attribute ids, from a JSON object like S3-Rec's item2attributes.json."""

    def __init__(self, attributes: dict[str, frozenset[str]]) -> None:
        self.attributes = attributes
        self._items_by_attribute: dict[str, list[str]] = defaultdict(list)
        for raw, values in attributes.items():
            for value in values:
                self._items_by_attribute[value].append(raw)

    @classmethod
    def from_json(cls, path: Path) -> ItemAttributes:
        return cls(read_item_attributes(path))

    def neighbours(self, raw: str, vocabulary: Vocabulary, limit: int = 50) -> list[int]:
        """Dense ids of known items sharing the most attributes with `raw` (most first)."""
        wanted = self.attributes.get(raw)
        if not wanted:
            return []
        overlap: Counter[int] = Counter()
        for value in wanted:
            for other in self._items_by_attribute[value]:
                dense = vocabulary.dense(other)
                if dense and other != raw:
                    overlap[dense] += 1
        return [dense for dense, _ in overlap.most_common(limit)]


def initial_row(table: torch.Tensor, neighbours: Sequence[int]) -> torch.Tensor:
    """[D]: the mean row of `neighbours` (dense ids), or of the whole table when none is known
    (an uninformed but in-distribution start)."""
    ids = [i for i in neighbours if 0 < i < len(table)]
    rows = table[torch.tensor(ids, dtype=torch.long)] if ids else table[1:]
    return rows.mean(dim=0)
