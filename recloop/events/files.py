"""Events from JSON-lines and CSV files (``recloop ingest``), with errors naming file and line."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

from recloop.events.base import (
    DEFAULT_EVENT_TYPE,
    EVENT_FIELDS,
    Event,
    EventLogError,
    event_problem,
)

FILE_BATCH_SIZE = 10_000  # events per batch from read_events_file (one append each)
_JSON_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})


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
