"""The durable event log of the online loop: serving and ``recloop ingest`` append, learners read.

Every logged event gets an integer **offset**, strictly increasing in log order, and an
``event_id`` (a string). Offsets are assigned in commit order, so a reader that has seen offset n
never later finds a new event at an offset <= n: ``read(after=n, ...)`` is a complete cursor.

Backends (one :class:`EventLog` interface, picked by :func:`recloop.events.factory.open_event_log`):

* :class:`SqliteEventLog`, the default: one embedded SQLite file in WAL mode with
  ``synchronous=FULL``, so ``append`` returns only after the batch's transaction is fsynced: an
  acknowledged event survives kill -9 and power loss. Offsets are dense (1, 2, 3, ...; the rowid
  of an AUTOINCREMENT table, never reused) and ``event_id`` is ``str(offset)``. Several processes
  may share the file (one writer at a time: ``BEGIN IMMEDIATE`` waits up to ``busy_timeout`` for
  the write lock; in WAL mode readers never wait) and several threads one object (a lock around
  one connection). WAL needs shared memory between the processes: keep the file on a local
  filesystem, not NFS.
* :class:`recloop.events.redis_streams.RedisStreamEventLog`, for many producers and learners on
  several hosts: one Redis stream, plus consumer groups to share work between learners. Durable
  only as far as the server is configured to be (``appendonly yes`` + ``appendfsync always``).

Consuming exactly once per published version
--------------------------------------------
A learner reads micro-batches with ``read(after, limit)`` and publishes model versions to the
registry (an atomic directory rename). The log and the registry are separate stores and no
transaction spans both, so the **published version is the source of truth**: the learner writes
the last offset it applied into that version's manifest, in the same publish (e.g. under
``training.events_offset``). After a crash anywhere (kill -9 before, during or after a publish)
it restarts from the offset recorded in the version it continues from (:func:`resume_offset`):
the events after it are applied again (none lost) and the events up to it are not (none applied
twice to a published version).

``commit(consumer, offset)`` is called *after* the publish and may therefore lag behind it (a
crash between the two); it exists for monitoring (lag = ``last_offset() - committed(...)``) and
future retention, and :func:`resume_offset` catches it up. Committed offsets only move forward.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from recloop.errors import RecloopError
from recloop.ids import raw_id_problem

DEFAULT_EVENT_TYPE = "interaction"
MAX_EVENT_TYPE_LENGTH = 64  # as in the HTTP schema of POST /v1/events
EVENT_FIELDS = ("user_id", "item_id", "timestamp", "event_type", "value")


class EventLogError(RecloopError):
    """A bad event, a bad log location, or an event log operation refused or failed."""


@dataclass(frozen=True, slots=True)
class Event:
    """One user-item interaction, as appended to the log."""

    user_id: str
    item_id: str
    timestamp: float  # seconds since the epoch
    event_type: str = DEFAULT_EVENT_TYPE
    value: float | None = None


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """An event as read back from the log, with its position."""

    offset: int  # strictly increasing in log order (dense for SQLite, see each backend)
    event: Event
    event_id: str  # str(offset) for SQLite, the stream entry id for Redis


# ------------------------------------------------------------------------------------ validation


def event_problem(event: object) -> str | None:
    """What is wrong with ``event``, naming the field, or None when it can be logged."""
    if not isinstance(event, Event):
        return f"expected an Event, got {type(event).__name__}"
    for name in ("user_id", "item_id"):
        value = getattr(event, name)
        if not isinstance(value, str):
            return f"{name} must be a string, got {type(value).__name__}"
        problem = raw_id_problem(value)
        if problem is not None:
            return f"{name} {problem}"
    if not _is_finite_number(event.timestamp):
        return f"timestamp must be a finite number of seconds, got {event.timestamp!r}"
    if not isinstance(event.event_type, str) or not event.event_type.strip():
        return f"event_type must be a non-empty string, got {event.event_type!r}"
    if len(event.event_type) > MAX_EVENT_TYPE_LENGTH:
        return f"event_type is longer than {MAX_EVENT_TYPE_LENGTH} characters"
    if event.value is not None and not _is_finite_number(event.value):
        return f"value must be a finite number or null, got {event.value!r}"
    return None


def validate_events(events: Sequence[Event]) -> None:
    """Raise EventLogError for the first bad event, naming its index in the batch and the field.

    Backends call this before touching storage, so a bad batch stores nothing.
    """
    for index, event in enumerate(events):
        problem = event_problem(event)
        if problem is not None:
            raise EventLogError(f"event {index} of the batch: {problem}; nothing was stored")


def _is_finite_number(value: object) -> bool:
    # bool is an int subclass; True as a timestamp is a caller bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value)


def check_offset(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EventLogError(f"event log: {name} must be an integer offset >= 0, got {value!r}")
    return value


def check_limit(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EventLogError(f"event log: limit must be an integer >= 0, got {value!r}")
    return value


def check_consumer(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise EventLogError(f"event log: consumer must be a non-empty string, got {value!r}")
    return value


# ------------------------------------------------------------------------------------ interface


class ClosedOnExit(ABC):
    """A log that is a context manager: ``with`` closes it."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class EventLog(ClosedOnExit):
    """An append-only, durable log of events, read by offset, with committed consumer offsets.

    Synchronous and thread-safe; async callers (the HTTP service) use a thread executor.
    """

    backend: str  # "sqlite" | "redis"

    @abstractmethod
    def append(self, events: Sequence[Event]) -> list[str]:
        """Append a batch, all or nothing; return the event ids in order.

        Durable, as far as the backend guarantees it, before it returns. A bad event raises
        EventLogError (naming its index and field) and stores nothing.
        """

    @abstractmethod
    def offset_of(self, event_id: str) -> int:
        """The offset of an event id that :meth:`append` returned."""

    @abstractmethod
    def read(self, after: int, limit: int) -> list[LoggedEvent]:
        """Up to ``limit`` events with offset > ``after``, in offset order (0: from the start)."""

    def read_pairs(self, after: int, limit: int) -> list[tuple[int, str, str]]:
        """(offset, user_id, item_id) of up to ``limit`` events after ``after``, in offset
        order: what user state is made of, without building events (a serving replica replays
        millions of them at start). Backends may override it with a cheaper query."""
        return [(e.offset, e.event.user_id, e.event.item_id) for e in self.read(after, limit)]

    @abstractmethod
    def committed(self, consumer: str) -> int:
        """The last offset committed by ``consumer`` (0 if it never committed)."""

    @abstractmethod
    def commit(self, consumer: str, offset: int) -> None:
        """Record that ``consumer`` is done with every event up to ``offset``.

        Refused (EventLogError) if it would move the consumer backwards or past the last offset;
        committing the current offset again is a no-op.
        """

    @abstractmethod
    def last_offset(self) -> int:
        """The offset of the newest event (0 for an empty log)."""

    @abstractmethod
    def count(self) -> int:
        """How many events the log holds."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; idempotent. Any other call afterwards raises EventLogError."""


def resume_offset(log: EventLog, consumer: str, published: int | None) -> int:
    """Where a restarted learner continues reading: after the offset ``published``.

    ``published`` is the offset recorded in the manifest of the model version the learner
    continues from (None: it has published nothing yet, so its committed offset is used). It is
    the source of truth, even when it is behind the log's commit (that version never saw the
    events after it); the log's commit is only moved forward, catching up a commit lost to a
    crash between publish and commit.
    """
    committed = log.committed(consumer)
    if published is None:
        return committed
    published = check_offset("published", published)
    if published > committed:
        log.commit(consumer, published)
    return published


def check_commit(consumer: str, offset: int, *, current: int | None, last: int | None) -> None:
    """Refuse a commit that moves ``consumer`` back from ``current`` or past ``last``, the end
    of the log (None: that side is not checked here)."""
    if current is not None and offset < current:
        raise EventLogError(
            f"consumer {consumer!r}: cannot commit offset {offset}, behind its committed offset "
            f"{current}; committed offsets only move forward"
        )
    if last is not None and offset > last:
        raise EventLogError(
            f"consumer {consumer!r}: cannot commit offset {offset}, past the last offset "
            f"{last} of the log"
        )
