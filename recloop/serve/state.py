"""User state and result cache for the recommendation service, behind one async interface.

User state is the bounded recent sequence of raw item ids that arrived at serving time, per raw
user id, most recent last. The service combines it with the training history itself; a store only
keeps what was appended. The result cache holds opaque payloads per (user, field) with a TTL;
appending events for a user drops all of that user's cached results, since they are stale.

Two backends share the :class:`StateStore` interface:

* :class:`MemoryStateStore`: in-process dicts, optionally snapshotted to a JSON-lines file on
  ``close()`` and reloaded on ``start()`` (one replica, or tests).
* :class:`recloop.serve.state_redis.RedisStateStore`: shared by several replicas, and resilient:
  while Redis is away it serves from a local mirror and queues appended events until it is back.

:func:`open_state_store` picks one from a URL and validates the options.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recloop.errors import ServingError
from recloop.fsutil import fsync_dir

__all__ = [
    "LOGGER_NAME",
    "MemoryStateStore",
    "Snapshot",
    "StateStore",
    "open_state_store",
]

# Both backends log under this name (the Redis one logs its outages and recoveries).
LOGGER_NAME = "recloop.serve.state"

SNAPSHOT_FORMAT = "recloop-state"
SNAPSHOT_VERSION = 2  # 2 records the event log offset; 1 (no offset) is still read

_MEMORY_OPTIONS = frozenset({"max_length", "cache_ttl", "cache_max_entries", "snapshot_path"})
_REDIS_OPTIONS = frozenset(
    {
        "max_length",
        "cache_ttl",
        "prefix",
        "pool_size",
        "socket_timeout",
        "connect_timeout",
        "mirror_max_users",
        "max_pending",
        "backoff_initial",
        "backoff_max",
    }
)
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class StateStore(ABC):
    """Recent raw item ids per raw user id, plus a TTL'd result cache keyed by (user, field)."""

    backend: str  # "memory" | "redis"

    @abstractmethod
    async def start(self) -> None:
        """Connect or load; call once, inside the event loop that will use the store."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections and background tasks (memory: write the snapshot if configured)."""

    @abstractmethod
    async def get_sequences(self, users: Sequence[str]) -> list[list[str]]:
        """The recent items of each user, oldest first ([] for an unknown user), in one batch."""

    @abstractmethod
    async def append_events(self, events: Sequence[tuple[str, str]]) -> None:
        """Append (user, item) pairs in arrival order, keep the last max_length per user and
        drop the cached results of those users. Durable in the backend when it returns."""

    @abstractmethod
    async def get_cached(self, user: str, field: str) -> bytes | None:
        """A cached payload, or None when absent, expired or the cache is unavailable."""

    @abstractmethod
    async def set_cached(self, user: str, field: str, payload: bytes) -> None:
        """Cache a payload for cache_ttl seconds (best effort: may be skipped)."""

    @abstractmethod
    async def invalidate_all(self) -> None:
        """Drop every cached result (e.g. after a model swap)."""

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """backend, connected, users, cache_entries, reconnects, pending, last_error."""


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pauses the cyclic garbage collector while millions of per-user containers are made
    (snapshot load, copy, log replay): none of them form cycles, and every full collection on
    the way walks all that exist so far (measured: a 500k-user snapshot loads 3x faster)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# ---------------------------------------------------------------------------------- validation


def check_int(name: str, value: object, *, minimum: int = 1) -> int:
    """``value`` as an int >= minimum, or a ServingError naming the parameter."""
    # bool is an int subclass; True as a length is a caller bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ServingError(f"state store: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_seconds(name: str, value: object) -> float:
    """``value`` as a finite number of seconds > 0, or a ServingError naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ServingError(f"state store: {name} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ServingError(f"state store: {name} must be > 0 seconds, got {value!r}")
    return seconds


# ------------------------------------------------------------------------------------- memory


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


@dataclass(frozen=True)
class Snapshot:
    """A state snapshot as read back: users' items and the event log offset they cover."""

    rows: list[tuple[str, list[str]]]
    log_offset: int | None  # None: written without an event log (or by format version 1)
    log: str | None  # the description of that log, for error messages


def write_snapshot(
    path: Path,
    sequences: Iterable[tuple[str, Iterable[str]]],
    *,
    log_offset: int | None = None,
    log: str | None = None,
) -> None:
    """Write sequences as JSON lines (a header line, then one user per line), atomically.

    The header records the event log offset the state covers: a restart loads the snapshot and
    replays the log after that offset. A crash mid-write leaves the previous snapshot intact:
    we write a temporary file in the same directory (same filesystem, so os.replace is atomic),
    fsync it, rename it over, then fsync the directory so the rename itself is durable.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ServingError(f"{path}: cannot write the state snapshot ({exc})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            header = {
                "format": SNAPSHOT_FORMAT,
                "version": SNAPSHOT_VERSION,
                "log_offset": log_offset,
                "log": log,
            }
            out.write(json.dumps(header) + "\n")
            for user, items in sequences:
                out.write(json.dumps({"user": user, "items": list(items)}) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp_name, path)
        fsync_dir(path.parent)
    except OSError as exc:
        Path(temp_name).unlink(missing_ok=True)
        raise ServingError(f"{path}: cannot write the state snapshot ({exc})") from None


def read_snapshot(path: Path) -> Snapshot:
    """A snapshot's rows and offset; a ServingError naming the file and line if corrupt."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ServingError(f"{path}: cannot read the state snapshot ({exc})") from None
    if not lines:
        raise ServingError(f"{path}:1: corrupt state snapshot (empty file, no header line)")
    log_offset, log = _check_header(path, lines[0])
    rows: list[tuple[str, list[str]]] = []
    for number, line in enumerate(lines[1:], start=2):
        if line.strip():
            rows.append(_parse_row(path, number, line))
    return Snapshot(rows, log_offset, log)


def _check_header(path: Path, line: str) -> tuple[int | None, str | None]:
    """(log offset, log) of a header line; version 1 snapshots have neither."""
    try:
        header = json.loads(line)
    except json.JSONDecodeError:
        header = None
    if isinstance(header, dict) and header.get("format") == SNAPSHOT_FORMAT:
        if header.get("version") == 1 and len(header) == 2:
            return None, None
        offset, log = header.get("log_offset"), header.get("log")
        if (
            header.get("version") == SNAPSHOT_VERSION
            and (offset is None or (type(offset) is int and offset >= 0))
            and (log is None or isinstance(log, str))
        ):
            return offset, log
    expected = {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "log_offset": "int|null"}
    raise ServingError(
        f"{path}:1: corrupt state snapshot (expected the header {json.dumps(expected)})"
    )


def _parse_row(path: Path, number: int, line: str) -> tuple[str, list[str]]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ServingError(f"{path}:{number}: corrupt state snapshot ({exc.msg})") from None
    user = row.get("user") if isinstance(row, dict) else None
    items = row.get("items") if isinstance(row, dict) else None
    if (
        not isinstance(user, str)
        or not isinstance(items, list)
        or not all(isinstance(item, str) for item in items)
    ):
        raise ServingError(
            f"{path}:{number}: corrupt state snapshot (expected "
            '{"user": string, "items": [strings]})'
        )
    return user, items


# -------------------------------------------------------------------------------------- factory


def open_state_store(url: str | None, **options: Any) -> StateStore:
    """A store for ``url``: None or "memory" -> in-process; "redis://..." -> Redis.

    ``options`` are the backend's constructor keywords. ``snapshot_path`` only applies to the
    memory backend; None is accepted (and ignored) for Redis so callers can pass it always.
    """
    if url is None or url == "memory":
        _check_options("memory", options, _MEMORY_OPTIONS)
        return MemoryStateStore(**options)
    if not isinstance(url, str) or not url.startswith(_REDIS_SCHEMES):
        raise ServingError(
            f"state store url {url!r}: expected 'memory' or a redis://, rediss:// or unix:// URL"
        )
    if options.pop("snapshot_path", None) is not None:
        raise ServingError(
            "state store: snapshot_path only applies to the memory backend (Redis persists itself)"
        )
    _check_options("redis", options, _REDIS_OPTIONS)
    # Imported here: state_redis imports this module (for StateStore), and the memory backend
    # should not need the Redis client at all.
    from recloop.serve.state_redis import RedisStateStore

    return RedisStateStore(url, **options)


def _check_options(backend: str, options: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ServingError(
            f"state store ({backend}): unknown option(s) {', '.join(unknown)}; "
            f"expected some of {', '.join(sorted(allowed))}"
        )
