"""Per-user encoder state (HSTU keys and values, see :mod:`recloop.models.hstu_kv`) as bytes,
keyed by (model version, user), in a bounded store.

A state belongs to one model version: weights change keys and values, so an entry of another
version is never read (the version is in the key). An in-process store belongs to one served
lineage, so :meth:`KVStore.retain` drops the old version's entries when it moves on; a shared
store (``shared``) is not cleared that way, because other replicas, or other arms of an
experiment, may still serve those versions: its unread entries age out of the LRU. Entries
are opaque bytes (safetensors, see :mod:`recloop.serve.incremental`), so a shared backend can
hold them as they are.

Two backends: :class:`MemoryKVStore` (in-process, the default) and :class:`RedisKVStore`
(shared by replicas). Both are called on the serving compute thread, in the batch, where the
async Redis client of :mod:`recloop.serve.state.redis` cannot be awaited: the Redis one has its
own blocking client with short timeouts.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any

from recloop.errors import ConfigError
from recloop.serve.state.base import LOGGER_NAME, check_int

log = logging.getLogger(LOGGER_NAME)

DEFAULT_KV_BYTES = 256 << 20  # 256 MiB: ~1000 users at max_length 200, dim 64, 2 blocks


class KVStore(ABC):
    """Bytes per (version, user), bounded; safe to call from any thread."""

    backend: str
    shared = False  # True: other processes read it too (never cleared by one of them)

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


# Atomic put: replace the entry, account its bytes, then evict least recently used entries
# (a sorted set by last use) until the total is within budget. KEYS: entry, lru, bytes.
# ARGV: payload, now (microseconds), max_bytes.
_PUT = """
local old = redis.call('STRLEN', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], KEYS[1])
local total = redis.call('INCRBY', KEYS[3], string.len(ARGV[1]) - old)
local evicted = 0
while total > tonumber(ARGV[3]) do
  local oldest = redis.call('ZPOPMIN', KEYS[2])
  if #oldest == 0 then break end
  total = redis.call('INCRBY', KEYS[3], -redis.call('STRLEN', oldest[1]))
  redis.call('DEL', oldest[1])
  evicted = evicted + 1
end
return evicted
"""
# Drop every entry whose key does not start with ARGV[1] (the kept version's prefix).
_RETAIN = """
local dropped = 0
for _, key in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if string.sub(key, 1, string.len(ARGV[1])) ~= ARGV[1] then
    redis.call('INCRBY', KEYS[2], -redis.call('STRLEN', key))
    redis.call('DEL', key)
    redis.call('ZREM', KEYS[1], key)
    dropped = dropped + 1
  end
end
return dropped
"""


class RedisKVStore(KVStore):
    """Entries shared by replicas in Redis (``{prefix}kv:{version}:{user}``), LRU within
    ``max_bytes`` across all of them (a sorted set by last use and a byte counter, updated
    atomically by Lua scripts). Called on the compute thread, so the client is the blocking
    one with short timeouts; while Redis does not answer, reads miss (users are encoded in
    full) and writes are skipped, and it is asked again after ``retry_seconds``."""

    backend = "redis"
    shared = True

    def __init__(
        self,
        url: str,
        max_bytes: int = DEFAULT_KV_BYTES,
        prefix: str = "recloop:",
        timeout: float = 0.1,
        retry_seconds: float = 1.0,
    ) -> None:
        import redis

        self.max_bytes = check_int("kv max_bytes", max_bytes)
        self.prefix = prefix
        self.retry_seconds = retry_seconds
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._put = self._client.register_script(_PUT)
        self._retain = self._client.register_script(_RETAIN)
        self._lru, self._total = f"{prefix}kv-lru", f"{prefix}kv-bytes"
        self._down_until = 0.0
        self.hits = self.misses = self.evictions = self.errors = 0

    def _key(self, version: str, user: str) -> str:
        return f"{self.prefix}kv:{version}:{user}"

    def _call(self, function: Any, default: Any) -> Any:
        """``function()``, or ``default`` while Redis is (or just went) away."""
        import redis

        if time.monotonic() < self._down_until:
            return default
        try:
            return function()
        except (redis.exceptions.RedisError, OSError) as exc:
            self.errors += 1
            self._down_until = time.monotonic() + self.retry_seconds
            log.warning("KV store: Redis did not answer (%s); states off for a while", exc)
            return default

    def get(self, version: str, user: str) -> bytes | None:
        key = self._key(version, user)

        def read() -> bytes | None:
            pipe = self._client.pipeline(transaction=False)
            pipe.get(key)
            pipe.zadd(self._lru, {key: time.time_ns() // 1000}, xx=True)  # touch (if present)
            payload: bytes | None = pipe.execute()[0]
            return payload

        payload: bytes | None = self._call(read, None)
        if payload is None:
            self.misses += 1
        else:
            self.hits += 1
        return payload

    def put(self, version: str, user: str, payload: bytes) -> None:
        if len(payload) > self.max_bytes:
            return
        keys = [self._key(version, user), self._lru, self._total]
        arguments: list[bytes | int] = [payload, time.time_ns() // 1000, self.max_bytes]
        self.evictions += int(self._call(lambda: self._put(keys=keys, args=arguments), 0))

    def retain(self, version: str) -> int:
        kept = self._key(version, "")
        return int(self._call(lambda: self._retain(keys=[self._lru, self._total], args=[kept]), 0))

    def status(self) -> dict[str, Any]:
        def read() -> tuple[int, int]:
            entries = int(self._client.zcard(self._lru))
            return entries, int(self._client.get(self._total) or 0)

        entries, total = self._call(read, (-1, -1))
        return {
            "backend": self.backend,
            "entries": entries,
            "bytes": total,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "errors": self.errors,
        }


def open_kv_store(url: str | None, max_bytes: int) -> KVStore:
    """None or "memory": in-process; redis://, rediss:// or unix://: Redis."""
    if url is None or url == "memory":
        return MemoryKVStore(max_bytes)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"kv store url {url!r}: expected 'memory' or a redis:// URL")
    return RedisKVStore(url, max_bytes)
