"""Test helpers for the event log: events with every field, paging through a log, and a child
process appending batches to a SQLite log (each acknowledged on stdout) with the checks that the
batches it wrote are whole, dense and in order."""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from recloop.events import Event, EventLog, LoggedEvent

__all__ = [
    "acknowledged",
    "batches_by_writer",
    "check_dense_and_whole",
    "make_events",
    "read_all",
    "start_writer",
]

REPO = Path(__file__).resolve().parents[1]


def make_events(n: int, start: int = 0) -> list[Event]:
    """Distinct events (item ids numbered from ``start``), with every optional field exercised."""
    return [
        Event(
            user_id=f"user{k % 7}",
            item_id=f"item{k}",
            timestamp=1_700_000_000.0 + k / 4,
            event_type="purchase" if k % 5 == 0 else "interaction",
            value=k / 2 if k % 3 == 0 else None,
        )
        for k in range(start, start + n)
    ]


def read_all(log: EventLog, page: int = 7) -> list[LoggedEvent]:
    """Every event of the log, paging with read(after, limit) like a learner does."""
    logged: list[LoggedEvent] = []
    after = 0
    while chunk := log.read(after, page):
        assert len(chunk) <= page
        logged += chunk
        after = chunk[-1].offset
    return logged


WRITER = """
import sys
from recloop.events import Event, SqliteEventLog

path, tag, batches, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
log = SqliteEventLog(path)
for b in range(batches):
    ids = log.append([Event(tag, f"{b}:{i}", float(b)) for i in range(size)])
    print(b, ids[0], ids[-1], flush=True)  # the acknowledgement the parent relies on
log.close()
"""


def start_writer(path: Path, tag: str, batches: int, size: int) -> subprocess.Popen[str]:
    """A child process appending ``batches`` batches of ``size`` events, one stdout line each."""
    command = [sys.executable, "-c", WRITER, str(path), tag, str(batches), str(size)]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)


def acknowledged(line: str) -> tuple[int, int, int]:
    batch, first, last = (int(field) for field in line.split())
    return batch, first, last


def batches_by_writer(logged: list[LoggedEvent]) -> dict[tuple[str, int], list[LoggedEvent]]:
    """The stored events grouped by (writer tag, batch number) from the ids "batch:index"."""
    groups: dict[tuple[str, int], list[LoggedEvent]] = defaultdict(list)
    for entry in logged:
        groups[entry.event.user_id, int(entry.event.item_id.split(":")[0])].append(entry)
    return groups


def check_dense_and_whole(logged: list[LoggedEvent], size: int) -> None:
    """Offsets 1..N with no duplicate event, and each batch whole, in order, at consecutive
    offsets (a batch is one transaction)."""
    assert [e.offset for e in logged] == list(range(1, len(logged) + 1))
    assert len({(e.event.user_id, e.event.item_id) for e in logged}) == len(logged)
    for (tag, batch), entries in batches_by_writer(logged).items():
        assert [e.event.item_id for e in entries] == [f"{batch}:{i}" for i in range(size)], tag
        assert entries[-1].offset - entries[0].offset == size - 1
