"""The in-process state store: deques per user, an LRU TTL cache, an optional snapshot file."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from recloop.serve.state.base import StateStore, check_int, check_seconds, gc_paused
from recloop.serve.state.snapshot import Snapshot, read_snapshot, write_snapshot


class MemoryStateStore(StateStore):
    """In-process state: deques per user, an LRU-bounded TTL cache, an optional snapshot file.

    Nothing here awaits; the methods are async only to honour the interface. The cache is not
    snapshotted: after a restart it would be stale or from another model anyway.
    """

    backend = "memory"

    def __init__(
        self,
        max_length: int = 50,
        cache_ttl: float = 60.0,
        cache_max_entries: int = 100_000,
        snapshot_path: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_length = check_int("max_length", max_length)
        self.cache_ttl = check_seconds("cache_ttl", cache_ttl)
        self.cache_max_entries = check_int("cache_max_entries", cache_max_entries)
        self.snapshot_path = Path(snapshot_path) if snapshot_path is not None else None
        self._clock = clock
        self._sequences: dict[str, deque[str]] = {}
        # (user, field) -> (expiry on the clock, payload); insertion/access order = LRU order.
        self._cache: OrderedDict[tuple[str, str], tuple[float, bytes]] = OrderedDict()
        # user -> its cached fields, so that an append invalidates a user without a full scan.
        self._fields: dict[str, set[str]] = {}
        self._started = False
        self._loaded = False
        # The event log offset whose prefix this state is the fold of (None: not tied to a
        # log); set together with the events it covers by apply_logged.
        self.log_offset: int | None = None
        self.log_name: str | None = None  # the log's description, written into snapshots
        self._dirty: set[str] | None = None  # users changed during a consistent_copy
        self._changes = 0  # appends so far, to skip snapshots of an unchanged state
        self._snapshot_changes = 0

    def load_snapshot(self) -> Snapshot | None:
        """Loads the snapshot file, if there is one, replacing the state; returns what it read.
        Synchronous, so that a service can refuse a corrupt snapshot before it binds a port."""
        self._loaded = True
        if self.snapshot_path is None or not self.snapshot_path.exists():
            return None
        with gc_paused():
            snapshot = read_snapshot(self.snapshot_path)
            self._sequences = {
                user: deque(items, maxlen=self.max_length) for user, items in snapshot.rows
            }
        self.log_offset = snapshot.log_offset
        return snapshot

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        if not self._loaded:
            self.load_snapshot()

    async def close(self) -> None:
        if self.snapshot_path is not None:
            await self.snapshot(force=True)

    async def snapshot(self, force: bool = False) -> bool:
        """Writes the snapshot file (off the event loop) when the state changed since the
        last one, or always with ``force``; returns whether it wrote."""
        path = self.snapshot_path
        if path is None or (not force and self._changes == self._snapshot_changes):
            return False
        changes = self._changes
        rows, offset = await self.consistent_copy()
        log_name = self.log_name
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: write_snapshot(path, rows, log_offset=offset, log=log_name)
        )
        self._snapshot_changes = changes
        return True

    async def consistent_copy(
        self, chunk: int = 20_000
    ) -> tuple[list[tuple[str, list[str]]], int | None]:
        """A copy of every user's items and the event log offset it covers, taken a chunk of
        users at a time so that requests keep being served while a large state is copied.

        Users whose items change while the copy runs are copied again at the end, in the same
        step (no await) as the offset is read, so the copy is exactly the state at that offset.
        """
        self._dirty = set()
        try:
            with gc_paused():
                users = list(self._sequences)
                copy: dict[str, list[str]] = {}
                for start in range(0, len(users), chunk):
                    for user in users[start : start + chunk]:
                        copy[user] = list(self._sequences[user])
                    await asyncio.sleep(0)
                for user in self._dirty:
                    copy[user] = list(self._sequences[user])
                return list(copy.items()), self.log_offset
        finally:
            self._dirty = None

    async def get_sequences(self, users: Sequence[str]) -> list[list[str]]:
        return [list(self._sequences.get(user, ())) for user in users]

    async def append_events(self, events: Sequence[tuple[str, str]]) -> None:
        self._append(events)

    def apply_logged(self, events: Sequence[tuple[str, str]], log_offset: int) -> None:
        """Appends events read from (or just written to) the event log and moves the offset the
        state covers to ``log_offset``, in one step: a snapshot never sees one without the other.
        """
        self._append(events)
        self.log_offset = log_offset

    def _append(self, events: Sequence[tuple[str, str]]) -> None:
        touched: set[str] = set()
        for user, item in events:
            sequence = self._sequences.get(user)
            if sequence is None:
                sequence = self._sequences[user] = deque(maxlen=self.max_length)
            sequence.append(item)  # the deque's maxlen drops the oldest
            touched.add(user)
        for user in touched:
            self._invalidate_user(user)
        if self._dirty is not None:
            self._dirty.update(touched)
        self._changes += 1

    async def get_cached(self, user: str, field: str) -> bytes | None:
        key = (user, field)
        entry = self._cache.get(key)
        if entry is None:
            return None
        expiry, payload = entry
        if self._clock() >= expiry:
            self._drop(key)
            return None
        self._cache.move_to_end(key)
        return payload

    async def set_cached(self, user: str, field: str, payload: bytes) -> None:
        key = (user, field)
        self._cache[key] = (self._clock() + self.cache_ttl, payload)
        self._cache.move_to_end(key)
        self._fields.setdefault(user, set()).add(field)
        while len(self._cache) > self.cache_max_entries:
            oldest = next(iter(self._cache))
            self._drop(oldest)

    async def invalidate_all(self) -> None:
        self._cache.clear()
        self._fields.clear()

    def status(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "connected": True,
            "users": len(self._sequences),
            "cache_entries": len(self._cache),  # may include expired entries not yet read
            "reconnects": 0,
            "pending": 0,
            "last_error": None,
            "snapshot": str(self.snapshot_path) if self.snapshot_path is not None else None,
            "log_offset": self.log_offset,
        }

    def _invalidate_user(self, user: str) -> None:
        for field in self._fields.pop(user, ()):
            self._cache.pop((user, field), None)

    def _drop(self, key: tuple[str, str]) -> None:
        self._cache.pop(key, None)
        user, field = key
        fields = self._fields.get(user)
        if fields is not None:
            fields.discard(field)
            if not fields:
                del self._fields[user]


# ----------------------------------------------------------------------------------- snapshot
