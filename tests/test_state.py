"""The state store: one contract for both backends, memory snapshots, the Redis layout and its
bounded pending queue. Redis lost under a running store: tests/test_faults.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from recloop.errors import ServingError
from recloop.serve.state.base import LOGGER_NAME, StateStore
from recloop.serve.state.factory import open_state_store
from recloop.serve.state.memory import MemoryStateStore
from recloop.serve.state.redis import RedisStateStore
from tests.redis_server import RedisServer, free_port, running_redis
from tests.state_helpers import Scenario, redis_call, run, state_records


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free port (fails, not skips, when it is not installed)."""
    with running_redis(tmp_path / "redis") as server:
        yield server


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """How a contract test makes a store of one backend and lets time pass for it."""

    name: str
    make: Callable[..., StateStore]
    advance: Callable[[float], Awaitable[None]]


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.now += seconds

        return Backend("memory", lambda **kw: MemoryStateStore(clock=clock, **kw), advance)
    server: RedisServer = request.getfixturevalue("redis_server")
    # Redis expires keys on its own clock, so time has to really pass.
    return Backend("redis", lambda **kw: RedisStateStore(server.url, **kw), asyncio.sleep)


# ------------------------------------------------------------------------------------ contract


def test_sequences_keep_order_and_trim(backend: Backend) -> None:
    async def scenario(store: StateStore) -> None:
        assert await store.get_sequences([]) == []
        assert await store.get_sequences(["nobody"]) == [[]]
        await store.append_events([("u1", "a"), ("u2", "x"), ("u1", "b")])
        await store.append_events([("u1", "c"), ("u1", "d")])
        assert await store.get_sequences(["u1"]) == [["b", "c", "d"]]  # max_length 3
        await store.append_events([])
        batch = await store.get_sequences(["u2", "nobody", "u1", "u2"])
        assert batch == [["x"], [], ["b", "c", "d"], ["x"]]

    run(backend.make(max_length=3), scenario)


def test_cache_round_trip_and_ttl(backend: Backend) -> None:
    async def scenario(store: StateStore) -> None:
        assert await store.get_cached("u1", "v1:10:true") is None
        await store.set_cached("u1", "v1:10:true", b"\x00payload")
        await store.set_cached("u1", "v1:5:true", b"other")
        assert await store.get_cached("u1", "v1:10:true") == b"\x00payload"
        assert await store.get_cached("u1", "v1:5:true") == b"other"
        assert await store.get_cached("u2", "v1:10:true") is None
        await backend.advance(0.6)
        assert await store.get_cached("u1", "v1:10:true") is None

    run(backend.make(cache_ttl=0.5), scenario)


def test_appending_invalidates_only_that_users_cache(backend: Backend) -> None:
    async def scenario(store: StateStore) -> None:
        for user in ("u1", "u2"):
            await store.set_cached(user, "v1:10:true", user.encode())
            await store.set_cached(user, "v1:20:false", user.encode())
        await store.append_events([("u1", "a")])
        assert await store.get_cached("u1", "v1:10:true") is None
        assert await store.get_cached("u1", "v1:20:false") is None
        assert await store.get_cached("u2", "v1:10:true") == b"u2"
        assert await store.get_cached("u2", "v1:20:false") == b"u2"

    run(backend.make(), scenario)


def test_invalidate_all_drops_every_cached_result(backend: Backend) -> None:
    async def scenario(store: StateStore) -> None:
        await store.append_events([("u1", "a")])
        for number in range(30):
            await store.set_cached(f"u{number}", "v1:10:true", b"p")
        await store.invalidate_all()
        for number in range(30):
            assert await store.get_cached(f"u{number}", "v1:10:true") is None
        assert await store.get_sequences(["u1"]) == [["a"]]  # sequences are not cache

    run(backend.make(), scenario)


def test_status_reports_the_backend(backend: Backend) -> None:
    async def scenario(store: StateStore) -> None:
        await store.append_events([("u1", "a")])
        status = store.status()
        assert status["backend"] == backend.name == store.backend
        assert status["connected"] is True
        assert status["pending"] == 0 and status["reconnects"] == 0
        assert status["last_error"] is None
        assert {"users", "cache_entries"} <= status.keys()

    run(backend.make(), scenario)


# -------------------------------------------------------------------------------------- memory


def test_memory_cache_is_lru_bounded() -> None:
    async def scenario(store: StateStore) -> None:
        await store.set_cached("u1", "f", b"1")
        await store.set_cached("u2", "f", b"2")
        assert await store.get_cached("u1", "f") == b"1"  # u1 is now the most recent
        await store.set_cached("u3", "f", b"3")
        assert await store.get_cached("u2", "f") is None
        assert await store.get_cached("u1", "f") == b"1"
        assert store.status()["cache_entries"] == 2

    run(MemoryStateStore(cache_max_entries=2), scenario)


def test_memory_snapshot_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "state" / "snapshot.jsonl"

    async def write(store: StateStore) -> None:
        await store.append_events([("u1", "a"), ("u:2", "é"), ("u1", "b"), ("u1", "c")])
        await store.set_cached("u1", "f", b"not snapshotted")

    async def read(store: StateStore) -> None:
        assert await store.get_sequences(["u1", "u:2", "u3"]) == [["b", "c"], ["é"], []]
        assert await store.get_cached("u1", "f") is None
        assert store.status()["users"] == 2

    run(MemoryStateStore(max_length=2, snapshot_path=path), write)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    run(MemoryStateStore(max_length=2, snapshot_path=path), read)
    # A smaller max_length on reload keeps the most recent items.
    run(MemoryStateStore(max_length=1, snapshot_path=path), _expect({"u1": ["c"]}))


def _expect(sequences: dict[str, list[str]]) -> Scenario:
    async def scenario(store: StateStore) -> None:
        users = list(sequences)
        assert await store.get_sequences(users) == [sequences[user] for user in users]

    return scenario


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("", 1),
        ('{"format": "something-else", "version": 1}\n', 1),
        ('{"format": "recloop-state", "version": 1}\n{"user": "u1", "items": ["a"]}\n{oops\n', 3),
        ('{"format": "recloop-state", "version": 1}\n{"user": "u1", "items": [1, 2]}\n', 2),
    ],
)
def test_memory_snapshot_corrupt(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "snapshot.jsonl"
    path.write_text(text)
    store = MemoryStateStore(snapshot_path=path)
    with pytest.raises(ServingError, match=rf"snapshot\.jsonl:{line}: corrupt state snapshot"):
        asyncio.run(store.start())


# ------------------------------------------------------------------------------------- factory


def test_open_state_store_picks_and_validates(tmp_path: Path) -> None:
    memory = open_state_store(None, max_length=5, snapshot_path=tmp_path / "s.jsonl")
    assert isinstance(memory, MemoryStateStore) and memory.max_length == 5
    assert open_state_store("memory").backend == "memory"
    redis_store = open_state_store("redis://127.0.0.1:1/0", cache_ttl=5, snapshot_path=None)
    assert isinstance(redis_store, RedisStateStore) and redis_store.cache_ttl == 5.0

    bad: list[tuple[str | None, dict[str, Any], str]] = [
        (None, {"max_length": 0}, "max_length must be an integer >= 1"),
        (None, {"cache_ttl": 0}, "cache_ttl must be > 0"),
        ("redis://localhost", {"cache_ttl": float("nan")}, "cache_ttl must be > 0"),
        ("redis://localhost", {"max_length": "10"}, "max_length must be an integer"),
        (None, {"pool_size": 4}, r"unknown option\(s\) pool_size"),
        ("postgres://db", {}, "expected 'memory' or a redis://"),
        ("redis://localhost", {"snapshot_path": tmp_path}, "snapshot_path only applies"),
    ]
    for url, options, message in bad:
        with pytest.raises(ServingError, match=message):
            open_state_store(url, **options)


# --------------------------------------------------------------------------------------- redis


def test_redis_layout(redis_server: RedisServer) -> None:
    """Keys as documented: trimmed lists, a hash per user with a TTL, SCAN-based invalidation."""
    url = redis_server.url

    async def scenario(store: StateStore) -> None:
        await redis_call(url, "SET", "other:cache:u1", "kept")
        await store.append_events([("u1", str(item)) for item in range(5)])
        assert await redis_call(url, "LRANGE", "t[1]:seq:u1", 0, -1) == [b"2", b"3", b"4"]
        await store.set_cached("u1", "v1:10:true", b"p")
        assert 0 < await redis_call(url, "PTTL", "t[1]:cache:u1") <= 30_000
        await store.invalidate_all()
        assert await redis_call(url, "EXISTS", "t[1]:cache:u1") == 0
        assert await redis_call(url, "GET", "other:cache:u1") == b"kept"

    # A prefix with glob characters: SCAN MATCH must treat it literally.
    run(RedisStateStore(url, max_length=3, cache_ttl=30, prefix="t[1]:"), scenario)


def test_redis_pending_queue_is_bounded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER_NAME)
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there

    async def scenario(store: StateStore) -> None:
        for item in range(5):
            await store.append_events([("u1", str(item))])
        status = store.status()
        assert status["pending"] == 3 and status["dropped_events"] == 2
        # The mirror still has everything the user did (bounded by max_length only).
        assert await store.get_sequences(["u1"]) == [["0", "1", "2", "3", "4"]]
        assert len(state_records(caplog, logging.WARNING)) == 2  # unreachable, then dropping

    run(RedisStateStore(url, max_pending=3), scenario)
