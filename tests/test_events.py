"""The event log: one contract for both backends, concurrent SQLite writers, Redis consumer
groups, the factory, and events files. The SQLite log under kill -9: tests/test_faults.py."""

from __future__ import annotations

import math
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from recloop.events import (
    Event,
    EventLog,
    EventLogError,
    SqliteEventLog,
    open_event_log,
    read_events_file,
    resume_offset,
)
from recloop.events import redis_streams as events_redis
from recloop.events.redis_streams import (
    RedisStreamEventLog,
    offset_to_stream_id,
    stream_id_to_offset,
)
from tests.event_log_helpers import (
    acknowledged,
    batches_by_writer,
    check_dense_and_whole,
    make_events,
    read_all,
    start_writer,
)
from tests.redis_server import RedisServer, free_port, running_redis

OpenLog = Callable[[], EventLog]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free port (fails, not skips, when it is not installed)."""
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def open_log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenLog]:
    """Opens a new log object on the same storage at each call (a reopen); all closed after."""
    if request.param == "sqlite":
        target = str(tmp_path / "logs" / "events.db")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        target = server.url
    opened: list[EventLog] = []

    def _open() -> EventLog:
        log = open_event_log(target)
        opened.append(log)
        return log

    yield _open
    for log in opened:
        log.close()


# ------------------------------------------------------------------------------------- contract


def test_contract_append_read_commit(open_log: OpenLog) -> None:
    log = open_log()
    assert (log.count(), log.last_offset(), log.read(0, 10)) == (0, 0, [])
    assert log.committed("learner") == 0
    assert log.append([]) == []

    batches = [make_events(5), make_events(1, start=5), make_events(20, start=6)]
    ids = [event_id for batch in batches for event_id in log.append(batch)]
    appended = [event for batch in batches for event in batch]
    assert len(set(ids)) == len(ids) == 26

    logged = read_all(log)
    offsets = [e.offset for e in logged]
    assert [e.event for e in logged] == appended  # in order, no gap, no duplicate
    assert [e.event_id for e in logged] == ids
    assert offsets == sorted(set(offsets))  # strictly increasing
    if log.backend == "sqlite":
        assert offsets == list(range(1, 27))  # dense
        assert ids == [str(offset) for offset in offsets]
    assert (log.count(), log.last_offset()) == (26, offsets[-1])
    assert log.read(offsets[-1], 10) == []
    assert log.read(offsets[9], 2) == logged[10:12]  # `after` is exclusive
    assert log.read(0, 0) == []

    log.commit("learner", offsets[9])
    log.commit("learner", offsets[9])  # the same offset again: a no-op
    assert log.committed("learner") == offsets[9]
    assert log.committed("other") == 0
    with pytest.raises(EventLogError, match=r"'learner'.*only move forward"):
        log.commit("learner", offsets[3])
    with pytest.raises(EventLogError, match="past the last offset"):
        log.commit("learner", offsets[-1] + 1)
    with pytest.raises(EventLogError, match="offset >= 0"):
        log.read(-1, 10)
    assert log.committed("learner") == offsets[9]
    log.commit("learner", offsets[-1])
    assert log.committed("learner") == offsets[-1]


def test_contract_bad_batch_stores_nothing(open_log: OpenLog) -> None:
    log = open_log()
    log.append(make_events(3))
    before = read_all(log)
    good = make_events(2, start=100)
    not_a_string: Any = 7
    bad_batches = {
        r"event 2 of the batch: user_id is empty": [*good, Event("", "i", 1.0)],
        r"event 1 of the batch: timestamp must be a finite": [good[0], Event("u", "i", math.nan)],
        r"event 0 of the batch: item_id must be a string": [Event("u", not_a_string, 1.0)],
        r"event 2 of the batch: value must be a finite": [
            *good,
            Event("u", "i", 1.0, value=math.inf),
        ],
        r"event 1 of the batch: event_type must be": [good[0], Event("u", "i", 1.0, event_type="")],
    }
    for message, batch in bad_batches.items():
        with pytest.raises(EventLogError, match=message):
            log.append(batch)
    assert read_all(log) == before
    assert (log.count(), log.last_offset()) == (3, before[-1].offset)
    # A rejected batch leaves no hole: the next append follows on directly.
    log.append(make_events(1, start=3))
    if log.backend == "sqlite":
        assert log.last_offset() == 4


def test_contract_reopen_sees_everything(open_log: OpenLog) -> None:
    first = open_log()
    ids = first.append(make_events(12))
    first.commit("learner", first.read(0, 5)[-1].offset)
    first.close()
    first.close()  # idempotent
    with pytest.raises(EventLogError, match="closed"):
        first.read(0, 1)

    second = open_log()
    logged = read_all(second)
    assert [e.event_id for e in logged] == ids
    assert [e.event for e in logged] == make_events(12)
    assert second.committed("learner") == logged[4].offset
    # Two open objects share the storage: an append through one is read through the other.
    third = open_log()
    third.append(make_events(1, start=12))
    assert second.count() == 13
    assert read_all(second)[-1].event == make_events(1, start=12)[0]


# --------------------------------------------------------------------------- concurrent writers


def test_sqlite_concurrent_appenders_keep_the_log_dense(tmp_path: Path) -> None:
    path, batches, size = tmp_path / "events.db", 25, 20
    writers = [start_writer(path, f"p{n}", batches, size) for n in range(2)]
    shared = SqliteEventLog(path)
    returned: dict[str, list[list[str]]] = {"t0": [], "t1": []}

    def append_batches(tag: str) -> None:
        for b in range(batches):
            batch = [Event(tag, f"{b}:{i}", float(b)) for i in range(size)]
            returned[tag].append(shared.append(batch))

    threads = [threading.Thread(target=append_batches, args=(tag,)) for tag in returned]
    for thread in threads:
        thread.start()
    outputs = [writer.communicate(timeout=60)[0] for writer in writers]
    for thread in threads:
        thread.join(timeout=60)
    assert [writer.returncode for writer in writers] == [0, 0]

    logged = read_all(shared, page=500)
    shared.close()
    assert len(logged) == 4 * batches * size
    check_dense_and_whole(logged, size)
    by_batch = batches_by_writer(logged)
    for tag, ids in returned.items():
        for b, batch_ids in enumerate(ids):
            assert batch_ids == [e.event_id for e in by_batch[tag, b]]
    for n, output in enumerate(outputs):
        for batch, first, last in map(acknowledged, output.splitlines()):
            entries = by_batch[f"p{n}", batch]
            assert (entries[0].offset, entries[-1].offset) == (first, last)


# ------------------------------------------------------------------------------------ Redis only


def test_redis_consumer_group_splits_acks_and_redelivers(redis_server: RedisServer) -> None:
    with RedisStreamEventLog(redis_server.url, stream="t:events", group="learners") as log:
        ids = log.append(make_events(10))
        first = log.read_group("a", 4)
        second = log.read_group("b", 100)
        # Each event goes to one consumer of the group.
        assert [e.event_id for e in first + second] == ids
        assert [e.event for e in first + second] == make_events(10)
        assert log.read_group("a", 10) == []
        assert log.read_group("a", 10, block_ms=50) == []  # waited, nothing new
        assert (log.pending_count(), log.pending_count("a"), log.pending_count("b")) == (10, 4, 6)

        assert log.ack([e.event_id for e in first]) == 4
        assert log.ack([e.event_id for e in first]) == 0  # acked already
        assert (log.pending_count("a"), log.pending_count("b")) == (0, 6)

        # "b" dies without acking: its events are redelivered to "c" once idle long enough.
        assert log.claim_stale("c", min_idle_ms=60_000, count=100) == []
        time.sleep(0.15)
        redelivered = log.claim_stale("c", min_idle_ms=100, count=100)
        assert redelivered == second
        assert (log.pending_count("b"), log.pending_count("c")) == (0, 6)
        assert log.ack([e.event_id for e in redelivered]) == 6
        assert log.pending_count() == 0

        # Another group consumes the same stream independently, from its start.
        with RedisStreamEventLog(redis_server.url, stream="t:events", group="audit") as other:
            assert [e.event_id for e in other.read_group("x", 100)] == ids


def test_redis_offsets_and_limits(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream_id = "1700000000123-5"
    assert stream_id_to_offset(stream_id) == 1700000000123 * 2**20 + 5
    assert offset_to_stream_id(stream_id_to_offset(stream_id)) == stream_id
    assert stream_id_to_offset("2-0") > stream_id_to_offset("1-999")
    with pytest.raises(EventLogError, match="seq >= 2"):
        stream_id_to_offset(f"1-{2**20}")

    monkeypatch.setattr(events_redis, "MAX_BATCH", 3)
    with RedisStreamEventLog(redis_server.url) as log:
        with pytest.raises(EventLogError, match="at most 3 events"):
            log.append(make_events(4))
        assert log.count() == 0
        with pytest.raises(EventLogError, match="block_ms"):
            log.read_group("a", 1, block_ms=60_000)


def test_redis_unreachable_is_an_event_log_error() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(EventLogError, match=r"127\.0\.0\.1.*create the consumer group failed"):
        open_event_log(url, socket_timeout=0.5)


# -------------------------------------------------------------------------- factory and resume


def test_open_event_log_picks_the_backend(tmp_path: Path, redis_server: RedisServer) -> None:
    default = tmp_path / "default" / "events.db"
    targets: list[str | Path | None] = [
        None,
        tmp_path / "a.db",
        str(tmp_path / "b.db"),
        f"sqlite://{tmp_path / 'c.db'}",
    ]
    for target in targets:
        with open_event_log(target, default_path=default, busy_timeout=5) as log:
            assert isinstance(log, SqliteEventLog)
    assert default.is_file()
    assert (tmp_path / "c.db").is_file()
    with open_event_log(redis_server.url, stream="s", maxlen=1000) as log:
        assert isinstance(log, RedisStreamEventLog)
        assert (log.stream, log.maxlen) == ("s", 1000)

    with pytest.raises(EventLogError, match="no default path"):
        open_event_log(None)
    with pytest.raises(EventLogError, match="unknown scheme 'http://'") as error:
        open_event_log("http://user:secret@host/events")
    assert "secret" not in str(error.value)
    with pytest.raises(EventLogError, match=r"unknown option.*stream"):
        open_event_log(tmp_path / "d.db", stream="s")
    with pytest.raises(EventLogError, match=r"unknown option.*busy_timeout"):
        open_event_log(redis_server.url, busy_timeout=1)
    with pytest.raises(EventLogError, match="expected a path"):
        open_event_log("")


def test_sqlite_refuses_other_files(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE events (x)")
    conn.close()
    with pytest.raises(EventLogError, match="not a recloop event log"):
        SqliteEventLog(other)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(EventLogError, match="not a usable SQLite event log"):
        SqliteEventLog(garbage)


def test_resume_offset_trusts_the_published_version(tmp_path: Path) -> None:
    with SqliteEventLog(tmp_path / "events.db") as log:
        log.append(make_events(10))
        log.commit("learner", 3)
        assert resume_offset(log, "learner", None) == 3  # nothing published yet
        # Crash after publishing offset 7 but before the commit: the commit catches up.
        assert resume_offset(log, "learner", 7) == 7
        assert log.committed("learner") == 7
        # Continuing from an older version (rolled back): re-apply from it; commits never go back.
        assert resume_offset(log, "learner", 5) == 5
        assert log.committed("learner") == 7


# ---------------------------------------------------------------------------------- events files


def test_read_events_file_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(
        '{"user_id": "u1", "item_id": "i1", "timestamp": 10.5, "value": 2}\n'
        "\n"
        '{"user_id": 7, "item_id": 42, "event_type": "purchase", "value": null}\n'
        '{"user_id": "u1", "item_id": "i2", "timestamp": "2024-01-01T00:00:00"}\n'
        '{"user_id": "u2", "item_id": "i3", "timestamp": "2024-01-01T01:00:00+01:00"}\n'
        '{"user_id": "u2", "item_id": "i4"}\n'
    )
    batches = list(read_events_file(path, batch_size=2, now=lambda: 99.0))
    assert [len(batch) for batch in batches] == [2, 2, 1]
    assert [event for batch in batches for event in batch] == [
        Event("u1", "i1", 10.5, value=2.0),
        Event("7", "42", 99.0, event_type="purchase"),
        Event("u1", "i2", 1_704_067_200.0),  # no zone: UTC
        Event("u2", "i3", 1_704_067_200.0),
        Event("u2", "i4", 99.0),
    ]
    # What `recloop ingest FILE` does with them.
    with SqliteEventLog(tmp_path / "events.db") as log:
        for batch in read_events_file(path):
            log.append(batch)
        assert log.count() == 5


def test_read_events_file_csv(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "\ufeffuser_id,item_id,timestamp,event_type,value\r\n"
        "u1,i1,10,click,1.5\r\n"
        'u2,"i,2",,,\r\n'
        "\r\n"
        "u3,i3,2024-01-01T00:00:00Z,purchase,\r\n"
    )
    events = [e for batch in read_events_file(path, now=lambda: 5.0) for e in batch]
    assert events == [
        Event("u1", "i1", 10.0, "click", 1.5),
        Event("u2", "i,2", 5.0),
        Event("u3", "i3", 1_704_067_200.0, "purchase"),
    ]
    # Only the two required columns, in any order; the content decides without a suffix.
    minimal = tmp_path / "events.txt"
    minimal.write_text("item_id,user_id\ni9,u9\n")
    assert list(read_events_file(minimal, now=lambda: 1.0)) == [[Event("u9", "i9", 1.0)]]


BAD_FILES = {
    "not valid JSON": ("bad.jsonl", '{"user_id": "u", "item_id": "i"}\n\n{"user_id": \n', 3),
    "unknown field.*timestmap": (
        "typo.jsonl",
        '{"user_id": "u", "item_id": "i", "timestmap": 1}\n',
        1,
    ),
    "expected one JSON object": ("list.jsonl", '{"user_id": "u", "item_id": "i"}\n[1, 2]\n', 2),
    "user_id is missing": ("missing.jsonl", '{"item_id": "i"}\n', 1),
    "user_id must be a string or an integer": (
        "float.jsonl",
        '{"user_id": 1.5, "item_id": "i"}\n',
        1,
    ),
    "timestamp must be a finite": ("nan.csv", "user_id,item_id,timestamp\nu,i,1\nu,i,nan\n", 3),
    "timestamp 'yesterday' is neither": (
        "when.csv",
        "user_id,item_id,timestamp\nu,i,yesterday\n",
        2,
    ),
    "value 'lots' is not a number": (
        "value.csv",
        "user_id,item_id,value\nu,i,1\nu,i,2\nu,i,lots\n",
        4,
    ),
    "3 fields, the header has 2": ("fields.csv", "user_id,item_id\nu,i,x\n", 2),
    "bad CSV header": ("header.csv", "user_id,item\nu,i\n", 1),
    "item_id is empty": ("empty.csv", "user_id,item_id\nu, \n", 2),
}


@pytest.mark.parametrize("message", BAD_FILES)
def test_read_events_file_errors_name_file_and_line(tmp_path: Path, message: str) -> None:
    name, text, line = BAD_FILES[message]
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(EventLogError, match=f"^{re.escape(f'{path}:{line}: ')}.*{message}"):
        for _batch in read_events_file(path, batch_size=1):
            pass


def test_read_events_file_unreadable(tmp_path: Path) -> None:
    with pytest.raises(EventLogError, match="cannot read events"):
        list(read_events_file(tmp_path / "absent.jsonl"))
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(b"user_id,item_id\nu,caf\xe9\n")
    with pytest.raises(EventLogError, match=r"latin1\.csv:2: not UTF-8"):
        list(read_events_file(latin1))
