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
from typing import Any

import torch

from recloop.data.attributes import read_item_attributes
from recloop.data.vocabulary import Vocabulary
from recloop.online.config import OnlineConfig

MAX_CONTEXT = 64  # co-occurring item ids kept per pending item (a bounded, recent sample)


@dataclass
class PendingItems:
    """Occurrences of items not yet in the vocabulary, with the items they co-occurred with.

    "count" admits an item at its `admit_after`-th occurrence; "decayed" (with `half_life`)
    when its occurrences, each halved every `half_life` events, add up to `admit_after`.
    With a `limit`, at most that many items are counted: the least recently seen is forgotten
    first (so an unbounded stream of ids, most seen once, keeps memory flat)."""

    admit_after: int
    limit: int | None = None
    half_life: float | None = None  # None: plain counts ("count")
    counts: Counter[str] = field(default_factory=Counter)  # least recently seen first
    contexts: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    scores: dict[str, tuple[float, int]] = field(default_factory=dict)  # decayed, as of offset

    @classmethod
    def for_config(cls, config: OnlineConfig) -> PendingItems:
        half_life = config.decay_half_life if config.admit == "decayed" else None
        return cls(config.admit_after, config.pending_limit, half_life)

    def observe(self, raw: str, context: Sequence[int], offset: int = 0) -> bool:
        """Counts one occurrence (at `offset`); True when `raw` is now due for admission."""
        self.counts[raw] = self.counts.pop(raw, 0) + 1  # re-inserted: now the most recent
        kept = self.contexts[raw]
        kept.extend(int(i) for i in context)
        del kept[:-MAX_CONTEXT]
        if self.limit is not None and len(self.counts) > self.limit:
            self.forget(next(iter(self.counts)))
        if self.half_life is None:
            return self.counts[raw] >= self.admit_after
        score, at = self.scores.get(raw, (0.0, offset))
        score = score * 2.0 ** (-(offset - at) / self.half_life) + 1.0
        self.scores[raw] = (score, offset)
        return bool(score >= self.admit_after - 1e-9)

    def admit(self, raw: str) -> list[int]:
        """Forgets `raw` and returns its co-occurring dense ids."""
        self.counts.pop(raw, None)
        self.scores.pop(raw, None)
        return self.contexts.pop(raw, [])

    def forget(self, raw: str) -> None:
        self.admit(raw)

    def __len__(self) -> int:
        return len(self.counts)

    def to_json(self) -> dict[str, Any]:
        """What a restart needs (in order: least recently seen first)."""
        return {
            "counts": list(self.counts.items()),
            "contexts": {raw: self.contexts[raw] for raw in self.counts if raw in self.contexts},
            "scores": {raw: list(value) for raw, value in self.scores.items()},
        }

    def restore(self, data: dict[str, Any]) -> None:
        self.counts = Counter({str(raw): int(n) for raw, n in data["counts"]})
        self.contexts = defaultdict(list, {str(k): list(v) for k, v in data["contexts"].items()})
        self.scores = {str(k): (float(v[0]), int(v[1])) for k, v in data["scores"].items()}


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
