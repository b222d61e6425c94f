"""The durable event log of the online loop: serving and ``recloop ingest`` append, learners read.

Every logged event gets an integer **offset**, strictly increasing in log order, and an
``event_id`` (a string). Offsets are assigned in commit order, so a reader that has seen offset n
never later finds a new event at an offset <= n: ``read(after=n, ...)`` is a complete cursor.

Backends (one :class:`EventLog` interface, picked by :func:`open_event_log`):

* :class:`SqliteEventLog`, the default: one embedded SQLite file in WAL mode with
  ``synchronous=FULL``, so ``append`` returns only after the batch's transaction is fsynced: an
  acknowledged event survives kill -9 and power loss. Offsets are dense (1, 2, 3, ...; the rowid
  of an AUTOINCREMENT table, never reused) and ``event_id`` is ``str(offset)``. Several processes
  may share the file (one writer at a time: ``BEGIN IMMEDIATE`` waits up to ``busy_timeout`` for
  the write lock; in WAL mode readers never wait) and several threads one object (a lock around
  one connection). WAL needs shared memory between the processes: keep the file on a local
  filesystem, not NFS.
* :class:`recloop.online.events_redis.RedisStreamEventLog`, for many producers and learners on
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

import csv
import json
import math
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from recloop.errors import RecloopError
from recloop.ids import raw_id_problem

__all__ = [
    "DEFAULT_EVENT_TYPE",
    "EVENT_FIELDS",
    "FILE_BATCH_SIZE",
    "Event",
    "EventLog",
    "EventLogError",
    "LoggedEvent",
    "SqliteEventLog",
    "event_problem",
    "open_event_log",
    "read_events_file",
    "resume_offset",
    "validate_events",
]

DEFAULT_EVENT_TYPE = "interaction"
MAX_EVENT_TYPE_LENGTH = 64  # as in the HTTP schema of POST /v1/events
EVENT_FIELDS = ("user_id", "item_id", "timestamp", "event_type", "value")
FILE_BATCH_SIZE = 10_000  # events per batch from read_events_file (one append each)
SCHEMA_VERSION = 1  # PRAGMA user_version of a SQLite event log

_SQLITE_OPTIONS = frozenset({"busy_timeout"})
_REDIS_OPTIONS = frozenset({"stream", "group", "maxlen", "socket_timeout"})
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_SQLITE_SCHEME = "sqlite://"
_JSON_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})


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


class EventLog(ABC):
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

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


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


# --------------------------------------------------------------------------------------- SQLite

_SCHEMA = (
    'CREATE TABLE events ("offset" INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, '
    "item_id TEXT NOT NULL, ts REAL NOT NULL, event_type TEXT NOT NULL, value REAL)",
    'CREATE TABLE consumers (name TEXT PRIMARY KEY, "offset" INTEGER NOT NULL)',
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
_INSERT = "INSERT INTO events (user_id, item_id, ts, event_type, value) VALUES (?, ?, ?, ?, ?)"
_SELECT = (
    'SELECT "offset", user_id, item_id, ts, event_type, value FROM events '
    'WHERE "offset" > ? ORDER BY "offset" LIMIT ?'
)
_SELECT_PAIRS = (
    'SELECT "offset", user_id, item_id FROM events WHERE "offset" > ? ORDER BY "offset" LIMIT ?'
)
# The last offset ever assigned. With AUTOINCREMENT it is what the next insert builds on, and the
# counter rolls back with a failed transaction, so offsets stay dense.
_LAST = "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)"
_COMMITTED = 'SELECT "offset" FROM consumers WHERE name = ?'
_UPSERT = (
    'INSERT INTO consumers (name, "offset") VALUES (?, ?) '
    'ON CONFLICT (name) DO UPDATE SET "offset" = excluded."offset"'
)


class SqliteEventLog(EventLog):
    """The embedded default: one SQLite file in WAL mode, fsynced on every append and commit."""

    backend = "sqlite"

    def __init__(self, path: Path | str, *, busy_timeout: float = 30.0) -> None:
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, int | float):
            raise EventLogError(f"event log: busy_timeout must be seconds, got {busy_timeout!r}")
        if not busy_timeout > 0:
            raise EventLogError(f"event log: busy_timeout must be > 0, got {busy_timeout!r}")
        self.path = Path(path)
        self.busy_timeout = float(busy_timeout)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; every write is an explicit
            # BEGIN IMMEDIATE ... COMMIT (see _immediate).
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,
                check_same_thread=False,  # shared by threads, serialised by self._lock
            )
        except (OSError, sqlite3.Error) as exc:
            raise EventLogError(f"{self.path}: cannot open the event log: {exc}") from exc
        try:
            self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise EventLogError(
                    f"{self.path}: SQLite refused WAL mode (journal_mode is {mode!r}); "
                    "the event log needs a file on a local filesystem"
                )
            # FULL: the WAL is fsynced at every commit (NORMAL would only survive a process
            # crash, not a power loss).
            conn.execute("PRAGMA synchronous = FULL")
            with _immediate(conn):
                self._check_schema(conn)
        except sqlite3.Error as exc:
            raise EventLogError(f"{self.path}: not a usable SQLite event log: {exc}") from exc

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        """Create the tables in a new file; refuse any other SQLite database."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if version != 0 or tables != 0:
            raise EventLogError(
                f"{self.path}: not a recloop event log (schema version {version}, "
                f"expected {SCHEMA_VERSION}, and {tables} existing tables)"
            )
        for statement in _SCHEMA:
            conn.execute(statement)

    @contextmanager
    def _connection(self, action: str) -> Iterator[sqlite3.Connection]:
        """The connection, held under the lock; SQLite errors become EventLogError."""
        with self._lock:
            if self._conn is None:
                raise EventLogError(f"{self.path}: {action}: the event log is closed")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                hint = ""
                if "locked" in str(exc) or "busy" in str(exc):
                    hint = f" (another writer held the lock for over {self.busy_timeout:g} s)"
                raise EventLogError(f"{self.path}: {action} failed: {exc}{hint}") from exc

    def append(self, events: Sequence[Event]) -> list[str]:
        validate_events(events)
        if not events:
            return []
        rows = [
            (
                e.user_id,
                e.item_id,
                float(e.timestamp),
                e.event_type,
                None if e.value is None else float(e.value),
            )
            for e in events
        ]
        with self._connection("append") as conn, _immediate(conn):
            first = conn.execute(_LAST).fetchone()[0] + 1
            conn.executemany(_INSERT, rows)
            last = conn.execute(_LAST).fetchone()[0]
            if last - first + 1 != len(rows):
                # The write lock makes the batch's offsets consecutive; anything else means the
                # file was edited behind our back. Roll back rather than return wrong ids.
                raise EventLogError(
                    f"{self.path}: append assigned offsets {first}..{last} to "
                    f"{len(rows)} events; nothing was stored"
                )
        return [str(offset) for offset in range(first, last + 1)]

    def offset_of(self, event_id: str) -> int:
        return int(event_id)  # the id is str(offset)

    def read(self, after: int, limit: int) -> list[LoggedEvent]:
        after = check_offset("after", after)
        if check_limit(limit) == 0:
            return []
        with self._connection("read") as conn:
            rows = conn.execute(_SELECT, (after, limit)).fetchall()
        return [_logged_row(row) for row in rows]

    def read_pairs(self, after: int, limit: int) -> list[tuple[int, str, str]]:
        after = check_offset("after", after)
        if check_limit(limit) == 0:
            return []
        with self._connection("read") as conn:
            rows: list[tuple[int, str, str]] = conn.execute(
                _SELECT_PAIRS, (after, limit)
            ).fetchall()
        return rows

    def committed(self, consumer: str) -> int:
        consumer = check_consumer(consumer)
        with self._connection("committed") as conn:
            return _committed(conn, consumer)

    def commit(self, consumer: str, offset: int) -> None:
        consumer = check_consumer(consumer)
        offset = check_offset("offset", offset)
        with self._connection("commit") as conn, _immediate(conn):
            last = conn.execute(_LAST).fetchone()[0]
            check_commit(consumer, offset, current=_committed(conn, consumer), last=last)
            conn.execute(_UPSERT, (consumer, offset))

    def last_offset(self) -> int:
        with self._connection("last_offset") as conn:
            last: int = conn.execute(_LAST).fetchone()[0]
            return last

    def count(self) -> int:
        with self._connection("count") as conn:
            count: int = conn.execute("SELECT count(*) FROM events").fetchone()[0]
            return count

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __repr__(self) -> str:
        return f"SqliteEventLog({str(self.path)!r})"


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction. BEGIN IMMEDIATE takes the write lock up front (waiting up to the
    busy timeout), so what it reads is still true when it commits."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # Some errors (e.g. a full disk) already rolled the transaction back.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _committed(conn: sqlite3.Connection, consumer: str) -> int:
    row = conn.execute(_COMMITTED, (consumer,)).fetchone()
    return 0 if row is None else int(row[0])


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


def _logged_row(row: tuple[Any, ...]) -> LoggedEvent:
    offset, user_id, item_id, ts, event_type, value = row
    return LoggedEvent(offset, Event(user_id, item_id, ts, event_type, value), str(offset))


# -------------------------------------------------------------------------------------- factory


def open_event_log(
    target: str | Path | None, *, default_path: str | Path | None = None, **options: Any
) -> EventLog:
    """An event log for ``target``, with the backend's constructor keywords in ``options``.

    * None: SQLite at ``default_path`` (the caller's default, e.g. under its data directory);
    * a Path, a plain path string or ``sqlite://PATH`` (so ``sqlite:///abs/events.db`` is
      absolute and ``sqlite://events.db`` relative): SQLite (option: busy_timeout);
    * ``redis://``, ``rediss://`` or ``unix://`` URLs: Redis Streams (options: stream, group,
      maxlen, socket_timeout).
    """
    if target is None:
        if default_path is None:
            raise EventLogError("event log: no location given and no default path")
        return _open_sqlite(Path(default_path), options)
    if isinstance(target, Path):
        return _open_sqlite(target, options)
    if not isinstance(target, str) or not target.strip():
        raise EventLogError(
            f"event log location {target!r}: expected a path, sqlite://PATH or a redis:// URL"
        )
    if target.startswith(_REDIS_SCHEMES):
        _check_options("redis", options, _REDIS_OPTIONS)
        # Imported here so that the SQLite default never needs the Redis client.
        from recloop.online.events_redis import RedisStreamEventLog

        return RedisStreamEventLog(target, **options)
    if target.startswith(_SQLITE_SCHEME):
        path = target.removeprefix(_SQLITE_SCHEME)
        if not path:
            raise EventLogError(f"event log url {target!r}: no path after sqlite://")
        return _open_sqlite(Path(path), options)
    if "://" in target:
        # Only the scheme is quoted: the rest of a URL may hold a password.
        scheme = target.split("://", 1)[0]
        raise EventLogError(
            f"event log url: unknown scheme {scheme + '://'!r} (expected sqlite://, redis://, "
            "rediss:// or unix://, or a plain path)"
        )
    return _open_sqlite(Path(target), options)


def _open_sqlite(path: Path, options: dict[str, Any]) -> SqliteEventLog:
    _check_options("sqlite", options, _SQLITE_OPTIONS)
    return SqliteEventLog(path, **options)


def _check_options(backend: str, options: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise EventLogError(
            f"event log ({backend}): unknown option(s) {', '.join(unknown)}; "
            f"expected: {', '.join(sorted(allowed))}"
        )


# ------------------------------------------------------------------------------- events files


def read_events_file(
    path: Path | str,
    *,
    batch_size: int = FILE_BATCH_SIZE,
    now: Callable[[], float] = time.time,
) -> Iterator[list[Event]]:
    """The events of a JSON-lines or CSV file, in batches of ``batch_size``, ready to append.

    JSON lines (``.jsonl``, ``.ndjson``, ``.json``, or content starting with ``{``): one object
    per line with ``user_id`` and ``item_id`` (strings or integers) and optionally ``timestamp``
    (seconds since the epoch or an ISO 8601 date, UTC when it has no zone; default: ``now()``),
    ``event_type`` (default "interaction") and ``value`` (number or null). CSV: a header naming
    ``user_id``, ``item_id`` and any of the optional columns; an empty cell means the default.
    Unknown fields are errors (a misspelt ``timestamp`` must not silently become "now").

    Errors are EventLogError naming ``file:line``. They surface while iterating: the batches
    before the bad line have already been yielded, so a caller that wants all or nothing from
    a file reads it to the end before appending anything.
    """
    path = Path(path)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EventLogError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    records = _json_records(path) if _is_json_lines(path) else _csv_records(path)
    batch: list[Event] = []
    for line, fields in records:
        batch.append(_parse_event(fields, f"{path}:{line}", now))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _is_json_lines(path: Path) -> bool:
    """By suffix, else by content: JSON lines start with '{', CSV with a header."""
    suffix = path.suffix.lower()
    if suffix in _JSON_SUFFIXES:
        return True
    if suffix == ".csv":
        return False
    try:
        with path.open("rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False  # _lines reports it, with the path
    return head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"{")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded one at a time so errors can name the line."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise EventLogError(f"{path}: cannot read events: {exc.strerror or exc}") from exc
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise EventLogError(
                    f"{path}:{number}: not UTF-8 text ({exc.reason} at byte {exc.start})"
                ) from None
            yield number, text.removeprefix("\ufeff") if number == 1 else text


def _json_records(path: Path) -> Iterator[tuple[int, Mapping[str, object]]]:
    for number, text in _lines(path):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EventLogError(
                f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        if not isinstance(record, dict):
            raise EventLogError(
                f"{path}:{number}: expected one JSON object per line, got {type(record).__name__}"
            )
        yield number, record


def _csv_records(path: Path) -> Iterator[tuple[int, Mapping[str, object]]]:
    # Each item fed to csv.reader is one physical line, so reader.line_num is the file's line.
    reader = csv.reader(text for _, text in _lines(path))
    try:
        header = next(reader, None)
        if header is None:
            return
        columns = _csv_columns(path, header)
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(columns):
                raise EventLogError(
                    f"{path}:{reader.line_num}: {len(row)} fields, the header has {len(columns)}"
                )
            yield reader.line_num, dict(zip(columns, row, strict=True))
    except csv.Error as exc:
        raise EventLogError(f"{path}:{reader.line_num}: bad CSV: {exc}") from None


def _csv_columns(path: Path, header: list[str]) -> list[str]:
    columns = [name.strip() for name in header]
    unknown = [name for name in columns if name not in EVENT_FIELDS]
    missing = [name for name in ("user_id", "item_id") if name not in columns]
    if unknown or missing or len(set(columns)) != len(columns):
        raise EventLogError(
            f"{path}:1: bad CSV header {','.join(columns)!r}: expected user_id and item_id, "
            f"optionally timestamp, event_type and value, each once"
        )
    return columns


class _BadField(ValueError):
    """A field of an events file that cannot be parsed; the message names the field."""


def _parse_event(fields: Mapping[str, object], where: str, now: Callable[[], float]) -> Event:
    unknown = sorted(set(fields) - set(EVENT_FIELDS))
    if unknown:
        raise EventLogError(
            f"{where}: unknown field(s) {', '.join(unknown)} (expected: {', '.join(EVENT_FIELDS)})"
        )
    try:
        event = Event(
            user_id=_parse_id(fields, "user_id"),
            item_id=_parse_id(fields, "item_id"),
            timestamp=_parse_timestamp(fields.get("timestamp"), now),
            event_type=_parse_event_type(fields.get("event_type")),
            value=_parse_value(fields.get("value")),
        )
    except _BadField as exc:
        raise EventLogError(f"{where}: {exc}") from None
    problem = event_problem(event)
    if problem is not None:
        raise EventLogError(f"{where}: {problem}")
    return event


def _parse_id(fields: Mapping[str, object], name: str) -> str:
    value = fields.get(name)
    if value is None:
        raise _BadField(f"{name} is missing")
    # Integer ids are common in JSON exports; floats and booleans are not ids.
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _BadField(f"{name} must be a string or an integer, got {value!r}")
    return str(value)


def _parse_timestamp(value: object, now: Callable[[], float]) -> float:
    if value is None or value == "":
        return now()
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _BadField(f"timestamp must be a number or an ISO 8601 date, got {value!r}")
    if not isinstance(value, str):
        return float(value)
    try:
        return float(value)
    except ValueError:
        pass
    try:
        date = datetime.fromisoformat(value.strip())
    except ValueError:
        raise _BadField(
            f"timestamp {value!r} is neither seconds since the epoch nor an ISO 8601 date"
        ) from None
    return (date if date.tzinfo is not None else date.replace(tzinfo=UTC)).timestamp()


def _parse_event_type(value: object) -> str:
    if value is None or value == "":
        return DEFAULT_EVENT_TYPE
    if not isinstance(value, str):
        raise _BadField(f"event_type must be a string, got {value!r}")
    return value


def _parse_value(value: object) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _BadField(f"value must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise _BadField(f"value {value!r} is not a number") from None
