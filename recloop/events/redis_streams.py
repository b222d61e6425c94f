"""Redis Streams backend of the event log, for many producers and learners on several hosts.

Layout (``stream`` defaults to ``recloop:events``)::

    {stream}            the stream; each entry has one field "event": the event as JSON
                        {"user_id", "item_id", "timestamp", "event_type", "value"} (never pickle)
    {stream}:offsets    hash: consumer name -> committed offset (decimal string)
    group {group}       a consumer group on the stream, created from the start ("0")

Offsets: a stream id is ``ms-seq``; its offset is ``ms * 2**20 + seq``, monotonic in log order
but sparse (``event_id`` keeps the stream id itself). It fits in 63 bits until the year 2248. A
seq >= 2**20 within one millisecond cannot be mapped: appends are capped at ``MAX_BATCH`` events
(a MULTI runs on one frozen clock, so a batch shares one ms), which leaves room unless the
server's clock steps back for long under a heavy load; reading such an entry raises.

Durability is the server's business: an acknowledged append is in Redis's memory, and survives a
crash of the server only with ``appendonly yes`` and ``appendfsync always`` (``everysec`` may
lose the last second). ``append`` sends its batch as one MULTI/EXEC, so other clients see all of
it or none; a command refused while queueing (e.g. out of memory) aborts the whole EXEC. A lost
connection during EXEC leaves the outcome unknown: the error says so, and a retry may duplicate
the batch. The client does not retry on its own for that reason. ``maxlen`` (off by default)
trims the oldest entries approximately, dropping events no reader may have seen yet: leave it
off unless something else keeps the stream bounded.

Two ways to consume, independent of each other:

* by offset: ``read(after, limit)`` (XRANGE) and ``commit``/``committed``, as in the interface;
  the exactly-once-per-published-version protocol of :mod:`recloop.events.base` uses these;
* by consumer group, to share work between learners, at least once: ``read_group`` delivers
  each new entry to one consumer of the group, ``ack`` marks it done, and ``claim_stale`` hands
  entries a consumer left un-acked for too long (it died) to another one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis.exceptions
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from recloop.events.base import (
    Event,
    EventLog,
    EventLogError,
    LoggedEvent,
    check_commit,
    check_consumer,
    check_limit,
    check_offset,
    validate_events,
)
from recloop.events.redis_url import redact_url

__all__ = [
    "DEFAULT_GROUP",
    "DEFAULT_STREAM",
    "MAX_BATCH",
    "RedisStreamEventLog",
    "decode_entry",
    "encode_event",
    "offset_to_stream_id",
    "stream_id_to_offset",
]

DEFAULT_STREAM = "recloop:events"
DEFAULT_GROUP = "recloop-learners"
SEQ_BITS = 20
SEQ_LIMIT = 1 << SEQ_BITS
MAX_BATCH = 100_000
ENTRY_FIELD = "event"

# Compare-and-set of a consumer's offset. Offsets exceed 2**53, where Lua numbers (doubles) lose
# precision, so they are compared as decimal strings without leading zeros: the longer string is
# the larger number, and equal lengths compare lexicographically.
_COMMIT_SCRIPT = """
local current = redis.call('HGET', KEYS[1], ARGV[1]) or '0'
local new = ARGV[2]
if #new < #current or (#new == #current and new < current) then
  return {0, current}
end
redis.call('HSET', KEYS[1], ARGV[1], new)
return {1, current}
"""


def stream_id_to_offset(stream_id: str) -> int:
    """``ms-seq`` -> ``ms * 2**20 + seq``."""
    ms_text, _, seq_text = stream_id.partition("-")
    try:
        ms, seq = int(ms_text), int(seq_text)
    except ValueError:
        raise EventLogError(f"event log: {stream_id!r} is not a stream id") from None
    if seq >= SEQ_LIMIT:
        raise EventLogError(
            f"event log: stream id {stream_id} has seq >= 2**{SEQ_BITS}, beyond what an offset "
            "can represent (the server's clock stepped back under heavy load?)"
        )
    return (ms << SEQ_BITS) | seq


def offset_to_stream_id(offset: int) -> str:
    """The inverse of :func:`stream_id_to_offset`."""
    return f"{offset >> SEQ_BITS}-{offset & (SEQ_LIMIT - 1)}"


def encode_event(event: Event) -> str:
    """The stream field of ``event``: compact, strict JSON (the event is validated: finite)."""
    fields = {
        "user_id": event.user_id,
        "item_id": event.item_id,
        "timestamp": float(event.timestamp),
        "event_type": event.event_type,
        "value": None if event.value is None else float(event.value),
    }
    return json.dumps(fields, separators=(",", ":"), allow_nan=False)


def decode_entry(stream_id: object, fields: object) -> LoggedEvent:
    """A stream entry as a LoggedEvent; EventLogError if it was not written by encode_event."""
    if not isinstance(stream_id, str):
        raise EventLogError(f"event log: {stream_id!r} is not a stream id")
    try:
        if not isinstance(fields, dict):
            raise TypeError(f"fields {fields!r}")
        data = json.loads(fields[ENTRY_FIELD])
        event = Event(
            user_id=data["user_id"],
            item_id=data["item_id"],
            timestamp=data["timestamp"],
            event_type=data["event_type"],
            value=data["value"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise EventLogError(
            f"event log: stream entry {stream_id} is not a recloop event ({exc!r})"
        ) from None
    return LoggedEvent(stream_id_to_offset(stream_id), event, stream_id)


class RedisStreamEventLog(EventLog):
    """The event log in one Redis stream, with committed offsets and a consumer group."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        *,
        stream: str = DEFAULT_STREAM,
        group: str = DEFAULT_GROUP,
        maxlen: int | None = None,
        socket_timeout: float = 10.0,
    ) -> None:
        for name, value in (("stream", stream), ("group", group)):
            if not isinstance(value, str) or not value:
                raise EventLogError(f"event log: {name} must be a non-empty string, got {value!r}")
        if maxlen is not None and (
            isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1
        ):
            raise EventLogError(
                f"event log: maxlen must be None or an integer >= 1, got {maxlen!r}"
            )
        if isinstance(socket_timeout, bool) or not isinstance(socket_timeout, int | float):
            raise EventLogError(
                f"event log: socket_timeout must be seconds, got {socket_timeout!r}"
            )
        if not socket_timeout > 0:
            raise EventLogError(f"event log: socket_timeout must be > 0, got {socket_timeout!r}")
        self.url = url
        self.stream = stream
        self.group = group
        self.maxlen = maxlen
        self.socket_timeout = float(socket_timeout)
        self.offsets_key = f"{stream}:offsets"
        self._where = f"event log {redact_url(url)} stream {stream!r}"
        try:
            client = Redis.from_url(
                url,
                decode_responses=True,
                socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_timeout,
                # No automatic retries: a retried EXEC whose reply was lost appends twice.
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:
            raise EventLogError(f"event log: invalid Redis url {redact_url(url)!r}: {exc}") from exc
        self._client: Redis | None = client
        self._commit_script = client.register_script(_COMMIT_SCRIPT)
        try:
            self._create_group()
        except BaseException:
            self.close()
            raise

    def _create_group(self) -> None:
        """The consumer group, from the start of the stream (MKSTREAM: even when empty)."""
        with self._redis("create the consumer group") as client:
            try:
                client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):  # the group exists already: fine
                    raise

    @contextmanager
    def _redis(self, action: str) -> Iterator[Redis]:
        """The client; Redis errors become EventLogError naming the server and the action."""
        if self._client is None:
            raise EventLogError(f"{self._where}: {action}: the event log is closed")
        try:
            yield self._client
        except redis.exceptions.RedisError as exc:
            raise EventLogError(f"{self._where}: {action} failed: {exc}") from exc

    # ----------------------------------------------------------------------------- interface

    def append(self, events: Sequence[Event]) -> list[str]:
        validate_events(events)
        if len(events) > MAX_BATCH:
            raise EventLogError(
                f"{self._where}: a batch holds at most {MAX_BATCH} events, got {len(events)}; "
                "nothing was stored"
            )
        if not events:
            return []
        payloads = [encode_event(event) for event in events]
        action = "append (on a lost connection the batch may or may not be stored)"
        with self._redis(action) as client, client.pipeline(transaction=True) as pipe:
            for payload in payloads:
                # maxlen None adds no MAXLEN clause: nothing is trimmed.
                pipe.xadd(self.stream, {ENTRY_FIELD: payload}, maxlen=self.maxlen)
            ids = pipe.execute()
        return [str(stream_id) for stream_id in ids]

    def offset_of(self, event_id: str) -> int:
        return stream_id_to_offset(event_id)

    def read(self, after: int, limit: int) -> list[LoggedEvent]:
        after = check_offset("after", after)
        if check_limit(limit) == 0:
            return []
        # "(" makes the lower bound exclusive (Redis >= 6.2); 0-0 is never an entry id.
        start = f"({offset_to_stream_id(after)}" if after > 0 else "-"
        with self._redis("read") as client:
            entries = client.xrange(self.stream, min=start, max="+", count=limit)
        return [decode_entry(stream_id, fields) for stream_id, fields in entries or []]

    def committed(self, consumer: str) -> int:
        consumer = check_consumer(consumer)
        with self._redis("committed") as client:
            value = client.hget(self.offsets_key, consumer)
        return 0 if value is None else int(value)

    def commit(self, consumer: str, offset: int) -> None:
        consumer = check_consumer(consumer)
        offset = check_offset("offset", offset)
        # The log only grows, so an offset <= last_offset now stays valid; the script then
        # makes the monotonic compare-and-set atomic against concurrent committers.
        check_commit(consumer, offset, current=None, last=self.last_offset())
        with self._redis("commit"):
            accepted, current = self._commit_script(
                keys=[self.offsets_key], args=[consumer, str(offset)]
            )
        if not int(accepted):
            check_commit(consumer, offset, current=int(current), last=None)

    def last_offset(self) -> int:
        with self._redis("last_offset") as client:
            newest = client.xrevrange(self.stream, max="+", min="-", count=1)
        return decode_entry(*newest[0]).offset if newest else 0

    def count(self) -> int:
        with self._redis("count") as client:
            length: int = client.xlen(self.stream)
        return length

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def __repr__(self) -> str:
        return f"RedisStreamEventLog({redact_url(self.url)!r}, stream={self.stream!r})"

    # ------------------------------------------------------------------------ consumer group

    def read_group(
        self, consumer: str, count: int, block_ms: int | None = None
    ) -> list[LoggedEvent]:
        """Up to ``count`` entries never delivered to any consumer of the group, now pending
        for ``consumer`` until acked. ``block_ms``: wait that long for new ones (None: don't)."""
        consumer = check_consumer(consumer)
        if check_limit(count) == 0:
            return []
        if block_ms is not None and not 0 <= block_ms < self.socket_timeout * 1000:
            # Redis answers a BLOCK only when it ends, so the socket must wait longer.
            raise EventLogError(
                f"event log: block_ms must be >= 0 and below socket_timeout "
                f"({self.socket_timeout:g} s), got {block_ms!r}"
            )
        with self._redis("read_group") as client:
            reply = client.xreadgroup(
                self.group, consumer, {self.stream: ">"}, count=count, block=block_ms
            )
        return _decode_read_reply(reply)

    def ack(self, event_ids: Sequence[str]) -> int:
        """Mark entries of the group done; returns how many were pending."""
        if not event_ids:
            return 0
        with self._redis("ack") as client:
            acked: int = client.xack(self.stream, self.group, *event_ids)
        return acked

    def claim_stale(self, consumer: str, min_idle_ms: int, count: int) -> list[LoggedEvent]:
        """Up to ``count`` entries pending for over ``min_idle_ms`` (delivered to a consumer that
        did not ack them, e.g. it died), now pending for ``consumer``: they are redelivered."""
        consumer = check_consumer(consumer)
        if check_limit(count) == 0:
            return []
        claimed: list[LoggedEvent] = []
        cursor = "0-0"
        with self._redis("claim_stale") as client:
            # XAUTOCLAIM scans a bounded part of the pending list per call: follow its cursor.
            while len(claimed) < count:
                cursor, entries, *_ = client.xautoclaim(
                    self.stream, self.group, consumer, min_idle_ms, cursor, count - len(claimed)
                )
                # Entries trimmed from the stream come back without fields (Redis < 7).
                claimed += [decode_entry(i, fields) for i, fields in entries if fields is not None]
                if cursor == "0-0":
                    break
        return claimed

    def pending_count(self, consumer: str | None = None) -> int:
        """Entries delivered but not acked, in the group or for one consumer."""
        with self._redis("pending_count") as client:
            summary = client.xpending(self.stream, self.group)
        if consumer is None:
            return int(summary["pending"])
        counts = {c["name"]: int(c["pending"]) for c in summary.get("consumers") or []}
        return counts.get(consumer, 0)


def _decode_read_reply(reply: Any) -> list[LoggedEvent]:
    """XREADGROUP's reply: [[stream, [(id, fields), ...]]] (RESP2) or {stream: [...]} (RESP3),
    or nothing when no entry arrived."""
    if not reply:
        return []
    per_stream = reply.values() if isinstance(reply, dict) else (item[1] for item in reply)
    return [decode_entry(i, fields) for entries in per_stream for i, fields in entries]
