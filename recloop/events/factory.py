"""Opening an event log by location: a path or sqlite:// (embedded), or a Redis URL.

It sits above the interface and both backends, so that no backend imports another."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recloop.events.base import EventLog, EventLogError
from recloop.events.sqlite import SqliteEventLog

_SQLITE_OPTIONS = frozenset({"busy_timeout"})
_REDIS_OPTIONS = frozenset({"stream", "group", "maxlen", "socket_timeout"})
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_SQLITE_SCHEME = "sqlite://"


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
        from recloop.events.redis_streams import RedisStreamEventLog

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
