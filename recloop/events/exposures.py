"""The exposure log: every list an experiment arm served, beside the event log.

An exposure is (experiment, arm, model version, user, the items shown in order, when). Each
serving replica appends what it served; ``recloop experiment report`` (and anything else that
attributes outcomes) reads them all back in log order, together with the event log, whichever
replica served a list and whichever received the user's next events.

Where it lives follows the event log it sits beside (:func:`open_exposure_log`):

* SQLite event log ``events.sqlite``: a second SQLite file ``events.exposures.sqlite`` in the
  same directory (WAL, like the event log; its own file so that the event log's schema stays
  what every reader of it expects);
* Redis Streams event log on stream ``S``: the stream ``S:exposures`` on the same server, each
  entry one field "exposure" holding the exposure as JSON.

Serving appends exposures in batches off the request path (a buffer flushed every second and
at shutdown), so a crash loses at most the last second's exposures: they are measurement, not
acknowledged user data, and a lost exposure only removes one list from the statistics (it can
never attribute an event to the wrong arm).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recloop.events.base import ClosedOnExit, EventLog, EventLogError, check_limit, check_offset

if TYPE_CHECKING:
    from redis import Redis

EXPOSURE_FIELD = "exposure"


@dataclass(frozen=True, slots=True)
class Exposure:
    """One list served by an experiment arm."""

    experiment: str
    arm: str
    version: str  # the model version that computed the list
    user_id: str
    items: tuple[str, ...]  # raw item ids, in the order shown
    timestamp: float  # seconds since the epoch, when it was served

    def to_json(self) -> str:
        return json.dumps(
            {
                "experiment": self.experiment,
                "arm": self.arm,
                "version": self.version,
                "user_id": self.user_id,
                "items": list(self.items),
                "timestamp": float(self.timestamp),
            },
            separators=(",", ":"),
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> Exposure:
        try:
            data = json.loads(text)
            return cls(
                experiment=str(data["experiment"]),
                arm=str(data["arm"]),
                version=str(data["version"]),
                user_id=str(data["user_id"]),
                items=tuple(str(item) for item in data["items"]),
                timestamp=float(data["timestamp"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EventLogError(f"{where}: not a recloop exposure ({exc!r})") from None


class ExposureLog(ClosedOnExit):
    """Append-only, read by offset (strictly increasing in log order, as the event log)."""

    @abstractmethod
    def append(self, exposures: Sequence[Exposure]) -> None:
        """Append a batch, all or nothing."""

    @abstractmethod
    def read(self, after: int, limit: int) -> list[tuple[int, Exposure]]:
        """Up to ``limit`` (offset, exposure) with offset > ``after``, in log order."""

    def read_all(self, batch: int = 10_000) -> list[Exposure]:
        out: list[Exposure] = []
        after = 0
        while chunk := self.read(after, batch):
            out += [exposure for _, exposure in chunk]
            after = chunk[-1][0]
        return out


class SqliteExposureLog(ExposureLog):
    """Exposures in their own SQLite file (WAL), one row of JSON each."""

    def __init__(self, path: Path | str, *, busy_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(
                'CREATE TABLE IF NOT EXISTS exposures ("offset" INTEGER PRIMARY KEY '
                "AUTOINCREMENT, data TEXT NOT NULL)"
            )
        except (OSError, sqlite3.Error) as exc:
            raise EventLogError(f"{self.path}: not a usable exposure log: {exc}") from exc
        self._conn: sqlite3.Connection | None = conn

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise EventLogError(f"{self.path}: the exposure log is closed")
        return self._conn

    def append(self, exposures: Sequence[Exposure]) -> None:
        rows = [(exposure.to_json(),) for exposure in exposures]
        if not rows:
            return
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO exposures (data) VALUES (?)", rows)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise EventLogError(f"{self.path}: exposure append failed: {exc}") from exc

    def read(self, after: int, limit: int) -> list[tuple[int, Exposure]]:
        after = check_offset("after", after)
        if check_limit(limit) == 0:
            return []
        with self._lock:
            try:
                rows = (
                    self._connection()
                    .execute(
                        'SELECT "offset", data FROM exposures WHERE "offset" > ? '
                        'ORDER BY "offset" LIMIT ?',
                        (after, limit),
                    )
                    .fetchall()
                )
            except sqlite3.Error as exc:
                raise EventLogError(f"{self.path}: exposure read failed: {exc}") from exc
        where = str(self.path)
        return [(int(offset), Exposure.from_json(data, where)) for offset, data in rows]

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class RedisExposureLog(ExposureLog):
    """Exposures in a Redis stream beside the event log's (same server)."""

    def __init__(self, client: Redis, stream: str, where: str) -> None:
        self._client: Redis | None = client
        self.stream = stream
        self._where = f"{where} stream {stream!r}"

    def _redis(self) -> Redis:
        if self._client is None:
            raise EventLogError(f"{self._where}: the exposure log is closed")
        return self._client

    def append(self, exposures: Sequence[Exposure]) -> None:
        import redis.exceptions

        if not exposures:
            return
        try:
            with self._redis().pipeline(transaction=True) as pipe:
                for exposure in exposures:
                    pipe.xadd(self.stream, {EXPOSURE_FIELD: exposure.to_json()})
                pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise EventLogError(f"{self._where}: exposure append failed: {exc}") from exc

    def read(self, after: int, limit: int) -> list[tuple[int, Exposure]]:
        import redis.exceptions

        from recloop.events.redis_streams import offset_to_stream_id, stream_id_to_offset

        after = check_offset("after", after)
        if check_limit(limit) == 0:
            return []
        start = f"({offset_to_stream_id(after)}" if after > 0 else "-"
        try:
            entries: Any = self._redis().xrange(self.stream, min=start, max="+", count=limit)
        except redis.exceptions.RedisError as exc:
            raise EventLogError(f"{self._where}: exposure read failed: {exc}") from exc
        return [
            (stream_id_to_offset(i), Exposure.from_json(fields[EXPOSURE_FIELD], self._where))
            for i, fields in entries or []
        ]

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


def exposure_path(event_log_path: Path) -> Path:
    """``events.sqlite`` -> ``events.exposures.sqlite`` (same directory)."""
    return event_log_path.with_name(f"{event_log_path.stem}.exposures{event_log_path.suffix}")


def open_exposure_log(event_log: EventLog) -> ExposureLog:
    """The exposure log beside ``event_log`` (see the module docstring)."""
    from recloop.events.sqlite import SqliteEventLog

    if isinstance(event_log, SqliteEventLog):
        return SqliteExposureLog(exposure_path(event_log.path), busy_timeout=event_log.busy_timeout)
    from redis import Redis

    from recloop.events.redis_streams import RedisStreamEventLog
    from recloop.events.redis_url import redact_url

    if not isinstance(event_log, RedisStreamEventLog):
        raise EventLogError(f"no exposure log for a {type(event_log).__name__}")
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = Redis.from_url(
        event_log.url,
        decode_responses=True,
        socket_timeout=event_log.socket_timeout,
        retry=Retry(NoBackoff(), 0),  # a retried EXEC whose reply was lost would log twice
    )
    return RedisExposureLog(client, f"{event_log.stream}:exposures", redact_url(event_log.url))
