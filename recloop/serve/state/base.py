"""User state and result cache for the recommendation service, behind one async interface.

User state is the bounded recent sequence of raw item ids that arrived at serving time, per raw
user id, most recent last. The service combines it with the training history itself; a store only
keeps what was appended. The result cache holds opaque payloads per (user, field) with a TTL;
appending events for a user drops all of that user's cached results, since they are stale.

Two backends share the :class:`StateStore` interface:

* :class:`recloop.serve.state.memory.MemoryStateStore`: in-process dicts, optionally
  snapshotted to a JSON-lines file on ``close()`` and reloaded on ``start()`` (one replica, or
  tests).
* :class:`recloop.serve.state.redis.RedisStateStore`: shared by several replicas, and resilient:
  while Redis is away it serves from a local mirror and queues appended events until it is back.

:func:`recloop.serve.state.factory.open_state_store` picks one from a URL and validates the options.
"""

from __future__ import annotations

import gc
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from recloop.errors import ServingError

# Both backends log under this name (the Redis one logs its outages and recoveries).
LOGGER_NAME = "recloop.serve.state"


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
