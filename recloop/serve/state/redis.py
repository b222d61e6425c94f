"""Redis backend of the state store, built to keep the service answering when Redis goes away.

Layout (``prefix`` defaults to ``recloop:``):

* ``{prefix}seq:{user}``: a list of raw item ids, oldest first; RPUSH + LTRIM keep the last
  ``max_length``.
* ``{prefix}cache:{user}``: a hash field -> payload. The whole hash gets ``cache_ttl`` when it is
  created (PEXPIRE NX, so a later HSET does not extend it: no payload outlives the TTL). Appending
  events DELetes the user's hash in the same pipeline as the RPUSH.

Resilience. The first connectivity error (refused, reset, timeout) marks the store *down* and logs
one warning; until a background task has pinged Redis back (backoff ``backoff_initial`` doubling
to ``backoff_max``) no call touches the network, so requests never queue behind socket timeouts.
While down:

* sequence reads come from a local "last known" mirror (an LRU of the sequences this process read
  or wrote recently),
* cache reads miss and cache writes are skipped,
* appended events go to the mirror and to a bounded in-order pending queue, which the reconnect
  task writes to Redis (dropping those users' cached results too) before it marks the store up and
  logs one info line. A batch whose pipeline fails half-way is queued again whole, so delivery is
  at least once: an outage at the wrong moment can duplicate a few events, never lose them
  (short of the pending bound or the process exiting while Redis is still away).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

import redis.exceptions
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from recloop.errors import ServingError
from recloop.events.redis_url import redact_url
from recloop.serve.state.base import (
    LOGGER_NAME,
    StateStore,
    check_int,
    check_seconds,
)

log = logging.getLogger(LOGGER_NAME)

# Errors that mean "Redis is unreachable", as opposed to a bad command or bad data. The builtin
# TimeoutError (what asyncio raises) is an OSError.
CONNECTIVITY_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)

FLUSH_CHUNK = 1000  # pending events per pipeline when catching up after an outage
UNLINK_CHUNK = 500  # cache keys per UNLINK in invalidate_all


class RedisStateStore(StateStore):
    """State and cache in Redis, with a local fallback while Redis is unreachable."""

    backend = "redis"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        max_length: int = 50,
        cache_ttl: float = 60.0,
        prefix: str = "recloop:",
        pool_size: int = 32,
        socket_timeout: float = 0.25,
        connect_timeout: float = 0.25,
        mirror_max_users: int = 200_000,
        max_pending: int = 1_000_000,
        backoff_initial: float = 0.1,
        backoff_max: float = 2.0,
    ) -> None:
        try:
            parse_url(url)
        except ValueError as exc:
            raise ServingError(
                f"state store: invalid Redis url {redact_url(url)!r}: {exc}"
            ) from exc
        self.url = url
        self.max_length = check_int("max_length", max_length)
        self.cache_ttl = check_seconds("cache_ttl", cache_ttl)
        self.prefix = prefix
        self.pool_size = check_int("pool_size", pool_size)
        self.socket_timeout = check_seconds("socket_timeout", socket_timeout)
        self.connect_timeout = check_seconds("connect_timeout", connect_timeout)
        self.mirror_max_users = check_int("mirror_max_users", mirror_max_users)
        self.max_pending = check_int("max_pending", max_pending)
        self.backoff_initial = check_seconds("backoff_initial", backoff_initial)
        self.backoff_max = max(check_seconds("backoff_max", backoff_max), self.backoff_initial)
        self._ttl_ms = max(1, round(self.cache_ttl * 1000))
        self._pool: ConnectionPool | None = None
        self._client: Redis | None = None
        # Bounds concurrent commands to the pool size: a plain ConnectionPool raises a
        # ConnectionError when exhausted, which would read as "Redis is down" under load.
        self._slots = asyncio.Semaphore(self.pool_size)
        self._connected = False
        self._expire_nx = True  # PEXPIRE ... NX needs Redis >= 7.0; checked on each connect
        self._mirror: OrderedDict[str, deque[str]] = OrderedDict()
        self._pending: deque[tuple[str, str]] = deque()
        self._pending_dropped = 0
        self._invalidate_on_reconnect = False
        self._reconnect_task: asyncio.Task[None] | None = None
        self._reconnects = 0
        self._down_since: float | None = None
        self._last_error: str | None = None

    @property
    def connected(self) -> bool:
        """Whether Redis answered last time (False while an outage is ridden out)."""
        return self._connected

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect. An unreachable Redis is not fatal (it is retried in the background); a
        rejected password is, since retrying cannot fix it."""
        if self._client is not None:
            raise ServingError("state store: start() called twice")
        self._pool = ConnectionPool.from_url(
            self.url,
            max_connections=self.pool_size,
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=self.connect_timeout,
            # One immediate retry hides a pooled socket that went stale (Redis restarted between
            # two calls); more would only make the first failing request slower.
            retry=Retry(NoBackoff(), 1),
        )
        self._client = Redis(connection_pool=self._pool)
        try:
            await self._handshake()
        except redis.exceptions.AuthenticationError as exc:
            await self._release_client()
            raise ServingError(
                f"state store: Redis at {redact_url(self.url)} rejected the credentials: {exc}"
            ) from exc
        except CONNECTIVITY_ERRORS as exc:
            self._mark_down(exc)
            return
        self._connected = True
        # debug, not info: the info line is reserved for "Redis is back" after an outage.
        log.debug("state store: connected to Redis at %s", redact_url(self.url))

    def check_reachable(self, timeout: float = 2.0) -> None:
        """Blocking PING before a service binds its port: a replica started against a Redis it
        cannot reach is an error that names it (a one-line exit), not a replica that comes up
        with empty user state. Outages after start are ridden out (see the module docstring)."""
        import redis as sync_redis

        client = sync_redis.Redis.from_url(
            self.url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        try:
            client.ping()
        except redis.exceptions.AuthenticationError as exc:
            raise ServingError(
                f"state store: Redis at {redact_url(self.url)} rejected the credentials: {exc}"
            ) from exc
        except (redis.exceptions.RedisError, OSError) as exc:
            raise ServingError(
                f"state store: Redis at {redact_url(self.url)} is unreachable: {describe(exc)}"
            ) from exc
        finally:
            client.close()

    async def close(self) -> None:
        task, self._reconnect_task = self._reconnect_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is None:
            return
        if self._pending:
            await self._final_flush()
        self._connected = False
        await self._release_client()

    async def _release_client(self) -> None:
        client, pool = self._client, self._pool
        self._client = self._pool = None
        if client is not None:
            await client.aclose()
        if pool is not None:
            await pool.aclose()

    async def _final_flush(self) -> None:
        """One last try to write events queued during an outage; say so if they are lost."""
        try:
            await self._reconnect_once()
        # RedisError covers redis' ConnectionError and TimeoutError; OSError the socket ones.
        except (redis.exceptions.RedisError, OSError, ServingError) as exc:
            log.warning(
                "state store: closing with %d events not written to Redis at %s (%s)",
                len(self._pending),
                redact_url(self.url),
                describe(exc),
            )

    # ------------------------------------------------------------------------------ sequences

    async def get_sequences(self, users: Sequence[str]) -> list[list[str]]:
        if not users:
            return []
        if self._connected:
            client = self._require_client()
            try:
                async with self._slots:
                    pipe = client.pipeline(transaction=False)
                    for user in users:
                        pipe.lrange(self._seq_key(user), -self.max_length, -1)
                    replies = await pipe.execute()
            except CONNECTIVITY_ERRORS as exc:
                self._mark_down(exc)
            except redis.exceptions.RedisError as exc:
                raise ServingError(f"state store: reading sequences from Redis: {exc}") from exc
            else:
                sequences = [[item.decode() for item in reply] for reply in replies]
                for user, sequence in zip(users, sequences, strict=True):
                    self._remember(user, deque(sequence, maxlen=self.max_length))
                return sequences
        return [self._recall(user) for user in users]

    async def append_events(self, events: Sequence[tuple[str, str]]) -> None:
        if not events:
            return
        self._apply_to_mirror(events)
        if not self._connected:
            self._enqueue(events)
            return
        try:
            await self._write_events(events)
        except CONNECTIVITY_ERRORS as exc:
            self._mark_down(exc)
            self._enqueue(events)

    async def _write_events(self, events: Sequence[tuple[str, str]]) -> None:
        """One pipeline: per user RPUSH the items in order, LTRIM, drop the cached results."""
        by_user: dict[str, list[str]] = {}
        for user, item in events:
            by_user.setdefault(user, []).append(item)
        client = self._require_client()
        async with self._slots:
            pipe = client.pipeline(transaction=False)
            for user, items in by_user.items():
                key = self._seq_key(user)
                pipe.rpush(key, *items)
                pipe.ltrim(key, -self.max_length, -1)
                pipe.delete(self._cache_key(user))
            try:
                await pipe.execute()
            except redis.exceptions.ResponseError as exc:
                raise ServingError(f"state store: writing events to Redis: {exc}") from exc

    # ------------------------------------------------------------------------------ cache

    async def get_cached(self, user: str, field: str) -> bytes | None:
        if not self._connected:
            return None
        client = self._require_client()
        try:
            async with self._slots:
                payload = await client.hget(self._cache_key(user), field)
        except CONNECTIVITY_ERRORS as exc:
            self._mark_down(exc)
            return None
        except redis.exceptions.RedisError as exc:
            raise ServingError(f"state store: reading the result cache: {exc}") from exc
        # bytes: the client does not decode responses (payloads are opaque).
        return payload if isinstance(payload, bytes) else None

    async def set_cached(self, user: str, field: str, payload: bytes) -> None:
        if not self._connected:
            return  # cache off while Redis is away
        client = self._require_client()
        key = self._cache_key(user)
        try:
            async with self._slots:
                pipe = client.pipeline(transaction=False)
                pipe.hset(key, field, payload)
                pipe.pexpire(key, self._ttl_ms, nx=self._expire_nx)
                await pipe.execute()
        except CONNECTIVITY_ERRORS as exc:
            self._mark_down(exc)
        except redis.exceptions.RedisError as exc:
            raise ServingError(f"state store: writing the result cache: {exc}") from exc

    async def invalidate_all(self) -> None:
        if self._connected:
            try:
                await self._delete_cache_keys()
                return
            except CONNECTIVITY_ERRORS as exc:
                self._mark_down(exc)
        # Redis keeps its data across our outage: drop the cache as soon as it is back.
        self._invalidate_on_reconnect = True

    async def _delete_cache_keys(self) -> None:
        """UNLINK every ``{prefix}cache:*`` key, found with SCAN (KEYS would block Redis)."""
        client = self._require_client()
        pattern = escape_glob(self.prefix) + "cache:*"
        async with self._slots:
            batch: list[bytes] = []
            async for key in client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= UNLINK_CHUNK:
                    await client.unlink(*batch)
                    batch.clear()
            if batch:
                await client.unlink(*batch)

    # ------------------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        down_for = None if self._down_since is None else time.monotonic() - self._down_since
        return {
            "backend": self.backend,
            "connected": self._connected,
            "url": redact_url(self.url),
            "prefix": self.prefix,
            # Counting users or cache entries in Redis needs a round trip; status() must not.
            "users": None,
            "cache_entries": None,
            "mirror_users": len(self._mirror),
            "reconnects": self._reconnects,
            "pending": len(self._pending),
            "dropped_events": self._pending_dropped,
            "down_for_s": None if down_for is None else round(down_for, 3),
            "last_error": self._last_error,
            "max_length": self.max_length,
        }

    # ------------------------------------------------------------------------------ outage

    def _mark_down(self, exc: BaseException) -> None:
        """Short-circuit further calls and start reconnecting; warn once per outage."""
        self._last_error = describe(exc)
        self._connected = False
        if self._reconnect_task is not None and not self._reconnect_task.done():
            return  # already down: the reconnect task is on it
        self._down_since = time.monotonic()
        log.warning(
            "state store: lost Redis at %s (%s); serving sequences from the local mirror, "
            "result cache off, queueing events until it is back",
            redact_url(self.url),
            self._last_error,
        )
        self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """Ping with backoff; once Redis answers, write what was queued, then mark it up."""
        delay = self.backoff_initial
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)
            try:
                written = await self._reconnect_once()
            except CONNECTIVITY_ERRORS as exc:
                self._last_error = describe(exc)
                log.debug("state store: Redis still unreachable: %s", self._last_error)
                continue
            except (redis.exceptions.RedisError, ServingError) as exc:
                # Reachable but refusing (e.g. out of memory, wrong key type): keep the events
                # queued and retry, loudly, since it needs an operator.
                self._last_error = describe(exc)
                log.error("state store: Redis is back but refuses writes: %s", self._last_error)
                continue
            down_for = time.monotonic() - (self._down_since or time.monotonic())
            # No await between the end of the flush and this line: an append cannot slip in
            # between and see "connected" while older events are still queued.
            self._connected = True
            self._down_since = None
            self._reconnects += 1
            log.info(
                "state store: Redis at %s is back after %.1f s; wrote %d queued events",
                redact_url(self.url),
                down_for,
                written,
            )
            return

    async def _reconnect_once(self) -> int:
        """Drop stale sockets, ping, write the pending work; the number of events written."""
        pool = self._pool
        if pool is None:
            raise ServingError("state store: not started")
        # Idle pooled sockets still point at the old server process; close them so the first
        # requests after the outage do not trip over them.
        await pool.disconnect(inuse_connections=False)
        await self._handshake()
        if self._invalidate_on_reconnect:
            await self._delete_cache_keys()
            self._invalidate_on_reconnect = False
        return await self._flush_pending()

    async def _flush_pending(self) -> int:
        """Write queued events in order, a chunk per pipeline; requeue a chunk that fails."""
        written = 0
        while self._pending:
            chunk = [self._pending.popleft() for _ in range(min(FLUSH_CHUNK, len(self._pending)))]
            try:
                await self._write_events(chunk)
            except BaseException:
                self._pending.extendleft(reversed(chunk))
                self._trim_pending()
                raise
            written += len(chunk)
        return written

    async def _handshake(self) -> None:
        client = self._require_client()
        async with self._slots:
            await client.ping()
            info: dict[str, Any] = await client.info("server")
        major = str(info.get("redis_version", "7")).split(".", 1)[0]
        self._expire_nx = not major.isdigit() or int(major) >= 7

    def _enqueue(self, events: Sequence[tuple[str, str]]) -> None:
        self._pending.extend(events)
        self._trim_pending()

    def _trim_pending(self) -> None:
        overflow = len(self._pending) - self.max_pending
        if overflow <= 0:
            return
        if self._pending_dropped == 0:
            log.warning(
                "state store: more than %d events queued while Redis is away; dropping the oldest",
                self.max_pending,
            )
        for _ in range(overflow):
            self._pending.popleft()
        self._pending_dropped += overflow

    # ------------------------------------------------------------------------------ mirror

    def _apply_to_mirror(self, events: Sequence[tuple[str, str]]) -> None:
        for user, item in events:
            sequence = self._mirror.get(user)
            if sequence is None:
                sequence = deque(maxlen=self.max_length)
            sequence.append(item)
            self._remember(user, sequence)

    def _remember(self, user: str, sequence: deque[str]) -> None:
        mirror = self._mirror
        mirror[user] = sequence
        mirror.move_to_end(user)
        if len(mirror) > self.mirror_max_users:
            mirror.popitem(last=False)

    def _recall(self, user: str) -> list[str]:
        sequence = self._mirror.get(user)
        if sequence is None:
            return []
        self._mirror.move_to_end(user)
        return list(sequence)

    # ------------------------------------------------------------------------------ helpers

    def _require_client(self) -> Redis:
        if self._client is None:
            raise ServingError("state store: call start() before using the Redis store")
        return self._client

    def _seq_key(self, user: str) -> str:
        return f"{self.prefix}seq:{user}"

    def _cache_key(self, user: str) -> str:
        return f"{self.prefix}cache:{user}"


def describe(exc: BaseException) -> str:
    """``Type: message`` (some socket errors have an empty message)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def escape_glob(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)
