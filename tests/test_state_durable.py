"""In-process user state as a fold of the event log: rebuild, catch-up, snapshots with offsets.

Known answers: the state after any sequence of appends, snapshots and restarts must equal the
fold of the whole log (each user's last ``max_length`` items, in log order).
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from recloop.errors import ServingError
from recloop.events import Event, SqliteEventLog
from recloop.serve.state.memory import MemoryStateStore
from recloop.serve.state.snapshot import read_snapshot, write_snapshot
from recloop.serve.state.sync import PAGE, LoggedState

MAX_LENGTH = 5


def events(pairs: list[tuple[str, str]]) -> list[Event]:
    return [Event(user, item, 1.0) for user, item in pairs]


def fold(log: SqliteEventLog, max_length: int = MAX_LENGTH) -> dict[str, list[str]]:
    """The reference: every user's last max_length items of the whole log, in log order."""
    state: dict[str, list[str]] = defaultdict(list)
    after = 0
    while page := log.read(after, 10_000):
        for logged in page:
            state[logged.event.user_id].append(logged.event.item_id)
        after = page[-1].offset
    return {user: items[-max_length:] for user, items in state.items()}


def pairs_for(count: int, users: int = 7, start: int = 0) -> list[tuple[str, str]]:
    return [(f"u{(start + i) % users}", f"i{start + i}") for i in range(count)]


class Replica:
    """A memory store + LoggedState over one log, started and stopped like the service does."""

    def __init__(self, log: SqliteEventLog, snapshot: Path | None) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.store = MemoryStateStore(max_length=MAX_LENGTH, snapshot_path=snapshot)
        self.store.load_snapshot()
        self.sync = LoggedState(self.store, log, self.executor, tail_seconds=None)
        self.sync.check_snapshot()

    async def start(self) -> None:
        await self.store.start()
        self.sync.start()
        while not self.sync.ready:
            await asyncio.sleep(0.001)

    async def state(self) -> dict[str, list[str]]:
        rows, _ = await self.store.consistent_copy()
        return dict(rows)

    async def stop(self) -> None:
        await self.sync.close()
        await self.store.close()
        self.executor.shutdown()


async def post(replica: Replica, log: SqliteEventLog, pairs: list[tuple[str, str]]) -> None:
    """What the service does for POST /v1/events: durable append, then apply in log order."""
    ids = log.append(events(pairs))
    await replica.sync.appended([log.offset_of(i) for i in ids], pairs)


def test_rebuild_from_the_log_alone_equals_the_fold(tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "events.sqlite")
    log.append(events(pairs_for(PAGE + 1234)))  # more than one page

    async def run() -> None:
        replica = Replica(log, None)
        await replica.start()
        assert await replica.state() == fold(log)
        progress = replica.sync.progress
        assert progress is not None and progress.events == PAGE + 1234
        assert progress.as_dict()["done"] is True and replica.store.log_offset == log.last_offset()
        await replica.stop()

    asyncio.run(run())


def test_snapshot_records_its_offset_and_a_restart_replays_only_the_tail(tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "events.sqlite")
    snapshot = tmp_path / "state.jsonl"

    async def run() -> None:
        first = Replica(log, snapshot)
        await first.start()
        await post(first, log, pairs_for(40))
        assert await first.store.snapshot() is True
        assert await first.store.snapshot() is False  # unchanged: nothing written
        assert read_snapshot(snapshot).log_offset == 40
        await post(first, log, pairs_for(25, start=40))  # after the snapshot; then "killed":
        first.executor.shutdown()  # no close, no final snapshot

        second = Replica(log, snapshot)
        await second.start()
        assert second.sync.progress is not None and second.sync.progress.events == 25
        assert await second.state() == fold(log)
        await second.stop()
        assert read_snapshot(snapshot).log_offset == 65  # the clean stop wrote the last one

    asyncio.run(run())


def test_events_of_other_writers_are_applied_in_log_order(tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "events.sqlite")
    other = SqliteEventLog(tmp_path / "events.sqlite")  # e.g. recloop ingest, another process

    async def run() -> None:
        replica = Replica(log, None)
        await replica.start()
        await post(replica, log, [("a", "1"), ("b", "2")])
        other.append(events([("a", "3"), ("c", "4")]))  # a gap before the next post
        await post(replica, log, [("a", "5")])
        assert (await replica.state())["a"] == ["1", "3", "5"]
        other.append(events([("c", "6")]))
        await replica.sync.tail()  # what the tail task does every tail_seconds
        assert await replica.state() == fold(log)
        await replica.stop()

    asyncio.run(run())


def test_batches_applied_out_of_order_still_fold_in_log_order(tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "events.sqlite")

    async def run() -> None:
        replica = Replica(log, None)
        await replica.start()
        first = log.append(events([("a", "1"), ("a", "2")]))
        second = log.append(events([("a", "3")]))
        # The second request's continuation runs first: it reads the gap from the log.
        await replica.sync.appended([log.offset_of(i) for i in second], [("a", "3")])
        await replica.sync.appended([log.offset_of(i) for i in first], [("a", "1"), ("a", "2")])
        assert (await replica.state())["a"] == ["1", "2", "3"]
        await replica.stop()

    asyncio.run(run())


def test_events_acknowledged_during_the_rebuild_are_in_the_state_when_it_is_ready(
    tmp_path: Path,
) -> None:
    log = SqliteEventLog(tmp_path / "events.sqlite")
    log.append(events(pairs_for(3 * PAGE)))

    async def run() -> None:
        replica = Replica(log, None)
        await replica.store.start()
        replica.sync.start()
        posted = 0
        while not replica.sync.ready:
            await post(replica, log, [("late", f"x{posted}")])
            posted += 1
            await asyncio.sleep(0)
        assert posted > 0
        assert await replica.state() == fold(log)
        await replica.stop()

    asyncio.run(run())


def test_consistent_copy_while_events_keep_arriving(tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "events.sqlite")

    async def run() -> None:
        replica = Replica(log, None)
        await replica.start()
        await post(replica, log, pairs_for(5000, users=2000))

        async def writer() -> None:
            for n in range(200):
                await post(replica, log, [(f"u{n % 2500}", f"late{n}")])
                await asyncio.sleep(0)

        task = asyncio.ensure_future(writer())
        rows, offset = await replica.store.consistent_copy(chunk=100)
        await task
        # The copy is exactly the fold of the log up to the offset it reports.
        prefix = SqliteEventLog(tmp_path / "prefix.sqlite")
        prefix.append([logged.event for logged in log.read(0, offset or 0)])
        assert dict(rows) == fold(prefix)
        assert offset is not None and 5000 < offset < log.last_offset()
        await replica.stop()

    asyncio.run(run())


def test_a_snapshot_ahead_of_the_log_is_refused_before_serving(tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "events.sqlite")
    log.append(events(pairs_for(3)))
    snapshot = tmp_path / "state.jsonl"
    write_snapshot(snapshot, [("u0", ["i0"])], log_offset=10, log="another log")
    with pytest.raises(ServingError, match=r"covers event log offset 10.*ends at offset 3"):
        Replica(log, snapshot)


def test_a_snapshot_without_an_offset_is_not_combined_with_a_log(tmp_path: Path) -> None:
    snapshot = tmp_path / "state.jsonl"
    # Format version 1, as written before snapshots recorded their offset: still readable.
    header = {"format": "recloop-state", "version": 1}
    row = {"user": "u0", "items": ["i0"]}
    snapshot.write_text(json.dumps(header) + "\n" + json.dumps(row) + "\n")
    assert read_snapshot(snapshot).rows == [("u0", ["i0"])]
    log = SqliteEventLog(tmp_path / "events.sqlite")
    with pytest.raises(ServingError, match="records no event log offset"):
        Replica(log, snapshot)


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ({"format": "recloop-state", "version": 2, "log_offset": -1, "log": None}, "offset"),
        ({"format": "recloop-state", "version": 2, "log_offset": "7", "log": None}, "offset"),
        ({"format": "recloop-state", "version": 3, "log_offset": 1, "log": None}, "version"),
    ],
)
def test_a_corrupt_snapshot_header_names_the_file_and_line(
    tmp_path: Path, header: dict[str, object], problem: str
) -> None:
    snapshot = tmp_path / "state.jsonl"
    snapshot.write_text(json.dumps(header) + "\n")
    with pytest.raises(ServingError, match=r"state.jsonl:1: corrupt state snapshot"):
        read_snapshot(snapshot)
