"""Test helpers for the online learner: a tiny trained base registry, events that follow a
pattern the base model never saw, a filled event log and the published online state."""

from __future__ import annotations

import random
from pathlib import Path

from recloop.events import Event, SqliteEventLog
from recloop.online.learner import OnlineState
from recloop.registry import Registry
from tests.serving import make_dataset, train_version

__all__ = [
    "NUM_ITEMS",
    "event_log",
    "pattern_events",
    "state_of",
    "successor",
    "train_base",
]

NUM_ITEMS = 120


def train_base(root: Path) -> tuple[Path, Path, str]:
    """(dataset dir, registry dir, version): a tiny SASRec trained on synthetic data."""
    data = make_dataset(root / "data", num_items=NUM_ITEMS)
    version = train_version(data, root / "registry", root / "run", seed=0)
    return data, root / "registry", version


def successor(item: int) -> int:
    """A fixed item -> item rule the base model never saw: the pattern online learning finds."""
    return (item * 7) % NUM_ITEMS + 1


def pattern_events(pairs: int, seed: int = 0) -> list[Event]:
    rng = random.Random(seed)
    events = []
    for i in range(pairs):
        user, item = str(rng.randrange(300)), rng.randrange(1, NUM_ITEMS + 1)
        events.append(Event(user, str(item), 1e9 + 2 * i))
        events.append(Event(user, str(successor(item)), 1e9 + 2 * i + 1))
    return events


def event_log(path: Path, events: list[Event]) -> SqliteEventLog:
    log = SqliteEventLog(path)
    log.append(events)
    return log


def state_of(registry: Registry, version: str) -> OnlineState:
    state = OnlineState.from_manifest(registry.manifest(version))
    assert state is not None
    return state
