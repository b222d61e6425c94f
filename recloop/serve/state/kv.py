"""Per-user encoder state (HSTU keys and values, see :mod:`recloop.models.hstu_kv`) as bytes,
keyed by (model version, user), in a bounded store.

A state belongs to one model version: weights change keys and values, so an entry of another
version is never read (the version is in the key) and :meth:`KVStore.retain` drops them all
when the served version changes. Entries are opaque bytes (safetensors, see
:mod:`recloop.serve.incremental`), so a shared backend can hold them as they are.

Only the in-process backend exists: it is read and written on the serving compute thread, in
the batch, where the async Redis client of :mod:`recloop.serve.state.redis` cannot be awaited.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any

from recloop.serve.state.base import check_int

DEFAULT_KV_BYTES = 256 << 20  # 256 MiB: ~1000 users at max_length 200, dim 64, 2 blocks


class KVStore(ABC):
    """Bytes per (version, user), bounded; safe to call from any thread."""

    backend: str

    @abstractmethod
    def get(self, version: str, user: str) -> bytes | None:
        """The stored state, or None."""

    @abstractmethod
    def put(self, version: str, user: str, payload: bytes) -> None:
        """Stores (replaces) a state; may evict others to stay in budget, or skip it."""

    @abstractmethod
    def retain(self, version: str) -> int:
        """Drops every entry of another version; returns how many went."""

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """backend, entries, bytes, max_bytes, hits, misses, evictions."""


class MemoryKVStore(KVStore):
    """An LRU of payloads within ``max_bytes`` (payload sizes; the dict's own few hundred bytes
    per entry are not counted). A payload larger than the whole budget is not stored."""

    backend = "memory"

    def __init__(self, max_bytes: int = DEFAULT_KV_BYTES) -> None:
        self.max_bytes = check_int("kv max_bytes", max_bytes)
        self._entries: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, version: str, user: str) -> bytes | None:
        with self._lock:
            payload = self._entries.get((version, user))
            if payload is None:
                self.misses += 1
                return None
            self._entries.move_to_end((version, user))
            self.hits += 1
            return payload

    def put(self, version: str, user: str, payload: bytes) -> None:
        key = (version, user)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            if len(payload) > self.max_bytes:
                return
            self._entries[key] = payload
            self._bytes += len(payload)
            while self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= len(dropped)
                self.evictions += 1

    def retain(self, version: str) -> int:
        with self._lock:
            stale = [key for key in self._entries if key[0] != version]
            for key in stale:
                self._bytes -= len(self._entries.pop(key))
            return len(stale)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "backend": self.backend,
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }
