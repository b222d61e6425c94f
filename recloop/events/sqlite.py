"""The embedded default event log: one SQLite file in WAL mode, fsynced on every append."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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

SCHEMA_VERSION = 1  # PRAGMA user_version of a SQLite event log

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


def _logged_row(row: tuple[Any, ...]) -> LoggedEvent:
    offset, user_id, item_id, ts, event_type, value = row
    return LoggedEvent(offset, Event(user_id, item_id, ts, event_type, value), str(offset))
