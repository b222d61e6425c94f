"""The state snapshot file: JSON lines (a header with the event log offset, one user a line)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from recloop.errors import ServingError
from recloop.fsutil import fsync_dir

SNAPSHOT_FORMAT = "recloop-state"
SNAPSHOT_VERSION = 2  # 2 records the event log offset; 1 (no offset) is still read


@dataclass(frozen=True)
class Snapshot:
    """A state snapshot as read back: users' items and the event log offset they cover."""

    rows: list[tuple[str, list[str]]]
    log_offset: int | None  # None: written without an event log (or by format version 1)
    log: str | None  # the description of that log, for error messages


def write_snapshot(
    path: Path,
    sequences: Iterable[tuple[str, Iterable[str]]],
    *,
    log_offset: int | None = None,
    log: str | None = None,
) -> None:
    """Write sequences as JSON lines (a header line, then one user per line), atomically.

    The header records the event log offset the state covers: a restart loads the snapshot and
    replays the log after that offset. A crash mid-write leaves the previous snapshot intact:
    we write a temporary file in the same directory (same filesystem, so os.replace is atomic),
    fsync it, rename it over, then fsync the directory so the rename itself is durable.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ServingError(f"{path}: cannot write the state snapshot ({exc})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            header = {
                "format": SNAPSHOT_FORMAT,
                "version": SNAPSHOT_VERSION,
                "log_offset": log_offset,
                "log": log,
            }
            out.write(json.dumps(header) + "\n")
            for user, items in sequences:
                out.write(json.dumps({"user": user, "items": list(items)}) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp_name, path)
        fsync_dir(path.parent)
    except OSError as exc:
        Path(temp_name).unlink(missing_ok=True)
        raise ServingError(f"{path}: cannot write the state snapshot ({exc})") from None


def read_snapshot(path: Path) -> Snapshot:
    """A snapshot's rows and offset; a ServingError naming the file and line if corrupt."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ServingError(f"{path}: cannot read the state snapshot ({exc})") from None
    if not lines:
        raise ServingError(f"{path}:1: corrupt state snapshot (empty file, no header line)")
    log_offset, log = _check_header(path, lines[0])
    rows: list[tuple[str, list[str]]] = []
    for number, line in enumerate(lines[1:], start=2):
        if line.strip():
            rows.append(_parse_row(path, number, line))
    return Snapshot(rows, log_offset, log)


def _check_header(path: Path, line: str) -> tuple[int | None, str | None]:
    """(log offset, log) of a header line; version 1 snapshots have neither."""
    try:
        header = json.loads(line)
    except json.JSONDecodeError:
        header = None
    if isinstance(header, dict) and header.get("format") == SNAPSHOT_FORMAT:
        if header.get("version") == 1 and len(header) == 2:
            return None, None
        offset, log = header.get("log_offset"), header.get("log")
        if (
            header.get("version") == SNAPSHOT_VERSION
            and (offset is None or (type(offset) is int and offset >= 0))
            and (log is None or isinstance(log, str))
        ):
            return offset, log
    expected = {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "log_offset": "int|null"}
    raise ServingError(
        f"{path}:1: corrupt state snapshot (expected the header {json.dumps(expected)})"
    )


def _parse_row(path: Path, number: int, line: str) -> tuple[str, list[str]]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ServingError(f"{path}:{number}: corrupt state snapshot ({exc.msg})") from None
    user = row.get("user") if isinstance(row, dict) else None
    items = row.get("items") if isinstance(row, dict) else None
    if (
        not isinstance(user, str)
        or not isinstance(items, list)
        or not all(isinstance(item, str) for item in items)
    ):
        raise ServingError(
            f"{path}:{number}: corrupt state snapshot (expected "
            '{"user": string, "items": [strings]})'
        )
    return user, items


# -------------------------------------------------------------------------------------- factory
