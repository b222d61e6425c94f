"""Fault injection with real processes, in one place: a component is killed or cut off at a bad
moment, comes back, and nothing it acknowledged is lost or applied twice. Bounded: each scenario
is a small, fixed number of kills or outages (seeded where the moment is random), with deadlines
on the waits for a process or a reconnect. One trained registry serves the whole module.

Serving replica
    test_serve_killed_at_random_moments_keeps_every_acknowledged_event: `recloop serve`
    (in-process state, SQLite event log, a snapshot every 0.3 s) is killed with SIGKILL at seeded
    random moments while a client streams ``POST /v1/events``; each restart answers
    ``GET /v1/users/{id}/events`` for every user with the fold of the event log, which holds every
    acknowledged event; after a clean stop a restart replays nothing.

Online learner
    test_kill_9_at_any_point_loses_nothing_and_applies_nothing_twice: `recloop online` is killed
    with SIGKILL between every pair of steps that matter (a batch trained, the state saved, a
    version published, the offset committed) and once at a random moment; resumed to the end it
    has published the same versions, bitwise the same weights, metrics and committed offset as a
    run that was never killed.

Event log
    test_sqlite_acknowledged_appends_survive_kill_9: a process appending batches to the SQLite log
    is killed with SIGKILL, most likely inside an append: every acknowledged batch is there once,
    at the offsets it was given, at most the batch in flight on top, each whole, and the log goes
    on densely.

Redis
    test_redis_outage_keeps_serving_and_replays_events: redis-server stops under a running state
    store: reads answer from the last known state without waiting on Redis, writes queue, and when
    it comes back (empty) the queued events are replayed and the cache is used again.
    test_redis_down_at_start_starts_degraded: no Redis at start: the store starts disconnected,
    queues, and connects and replays once Redis is up.
    test_redis_backend_shares_state_and_survives_an_outage: two replicas of the HTTP service share
    one Redis (an event posted to one changes the other's answer); Redis stops mid-run: the
    replica keeps answering from the last known state, /readyz says not ready (and why), requests
    from a balancer that ask for a ready replica get 503 at once; Redis back, ready again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
import torch

from recloop.events import Event, SqliteEventLog
from recloop.online.control import CRASH_ENV
from recloop.online.prequential import CSV_NAME
from recloop.registry import Registry
from recloop.serve.fastpath import REQUIRE_READY_HEADER
from recloop.serve.server import free_port
from recloop.serve.state.base import LOGGER_NAME, StateStore
from recloop.serve.state.redis import RedisStateStore
from tests.event_log_helpers import (
    acknowledged,
    batches_by_writer,
    check_dense_and_whole,
    make_events,
    read_all,
    start_writer,
)
from tests.online_helpers import event_log, pattern_events, state_of, train_base
from tests.redis_server import RedisServer, running_redis
from tests.serving import API_KEY, config_for, known_user, running_service
from tests.state_helpers import redis_call, run, state_records
from tests.warm_interpreter import WarmInterpreter, WarmProcess, warm_interpreter

REQUIRE_READY = REQUIRE_READY_HEADER.decode()
USERS = [f"fault-user-{n}" for n in range(12)]
ITEMS = [str(n) for n in range(1, 60)]
CYCLES = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny SASRec for every test here (read only: the learner test works on copies)."""
    root = tmp_path_factory.mktemp("faults")
    data, registry, version = train_base(root)
    return {"data": data, "registry": registry, "v1": version, "root": root}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free port (fails, not skips, when it is not installed)."""
    with running_redis(tmp_path / "redis") as server:
        yield server


# ---------------------------------------------------------------------------------- serving replica


@dataclass
class Acknowledged:
    """Events the service answered 200 to, by event id (the log offset)."""

    events: dict[int, tuple[str, str]] = field(default_factory=dict)
    failed: int = 0  # requests cut off by the kill: not acknowledged, may or may not be stored


@dataclass
class Replica:
    process: WarmProcess
    url: str
    log: Path


def start_replica(
    warm: WarmInterpreter, registry: Path, workdir: Path, port: int, onnx_cache: Path
) -> Replica:
    command = [
        "serve",
        "--registry",
        str(registry),
        "--port",
        str(port),
        "--event-log",
        str(workdir / "events.sqlite"),
        "--state-snapshot",
        str(workdir / "state.jsonl"),
        "--snapshot-every",
        "0.3",
        "--cache-dir",
        str(onnx_cache),  # the module's: one ONNX export for every replica here
        "--no-cache",
        "--threads",  # as replica_env's thread variables say (the default would be automatic)
        "1",
    ]
    process = warm.start("recloop.cli", command, replica_env(), workdir / "serve.log")
    STARTED.setdefault(workdir, []).append(process)
    replica = Replica(process, f"http://127.0.0.1:{port}", workdir / "events.sqlite")
    wait_ready(replica, timeout=120)
    return replica


def wait_ready(replica: Replica, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if replica.process.poll() is not None:
            raise AssertionError(f"recloop serve exited with {replica.process.returncode}")
        try:
            if httpx.get(f"{replica.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"recloop serve not ready within {timeout} s")


def stream_events(
    url: str, items: list[str], stop: threading.Event, seed: int, acked: Acknowledged
) -> None:
    """Posts small batches until ``stop`` or until the server goes away."""
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=5, headers={"X-API-Key": API_KEY}) as client:
        while not stop.is_set():
            batch = [(rng.choice(USERS), rng.choice(items)) for _ in range(rng.randint(1, 4))]
            body = {"events": [{"user_id": u, "item_id": i} for u, i in batch]}
            try:
                response = client.post("/v1/events", json=body)
            except httpx.TransportError:
                acked.failed += 1
                return  # killed: this request was never acknowledged
            assert response.status_code == 200, response.text
            answer = response.json()
            assert answer["durable"] is True
            for event_id, pair in zip(answer["event_ids"], batch, strict=True):
                acked.events[int(event_id)] = pair


def log_fold(
    path: Path, max_length: int = 200
) -> tuple[dict[str, list[str]], dict[int, tuple[str, str]]]:
    """Each user's items in log order (the last max_length), and every logged event by offset."""
    log = SqliteEventLog(path)
    try:
        logged = log.read(0, 10_000_000)
    finally:
        log.close()
    state: dict[str, list[str]] = defaultdict(list)
    for event in logged:
        state[event.event.user_id].append(event.event.item_id)
    by_offset = {event.offset: (event.event.user_id, event.event.item_id) for event in logged}
    return {user: items[-max_length:] for user, items in state.items()}, by_offset


def served_state(url: str) -> dict[str, list[str]]:
    with httpx.Client(base_url=url, timeout=10, headers={"X-API-Key": API_KEY}) as client:
        answers = {user: client.get(f"/v1/users/{user}/events") for user in USERS}
    assert all(answer.status_code == 200 for answer in answers.values())
    return {
        user: answer.json()["items"] for user, answer in answers.items() if answer.json()["items"]
    }


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    # Whatever the test's outcome, no replica outlives it.
    for process in STARTED.pop(tmp_path, []):
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    log = tmp_path / "serve.log"
    if log.exists() and os.environ.get("RECLOOP_SHOW_FAULT_LOGS"):
        sys.stderr.write(log.read_text(errors="replace"))


STARTED: dict[Path, list[WarmProcess]] = {}  # replicas by workdir, for teardown


def replica_env() -> dict[str, str]:
    env = {**os.environ, "RECLOOP_API_KEY": API_KEY}
    # What `recloop serve` sets before numpy and torch load (--threads 1), set before the warm
    # interpreter loads them, so the replicas' native thread pools are the ones serve asks for.
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, "1")
    return env


@pytest.fixture(scope="module")
def warm_serve() -> Iterator[WarmInterpreter]:
    """Each `recloop serve` here is forked from an interpreter that has imported torch and the
    web stack: the same process five times, without five imports of them. Module-scoped, so it
    outlives `workdir`, whose teardown stops any replica a failed test left running."""
    with warm_interpreter(["torch", "onnxruntime", "fastapi", "uvicorn"], replica_env()) as warm:
        yield warm


@pytest.mark.slow
def test_serve_killed_at_random_moments_keeps_every_acknowledged_event(
    trained: dict[str, Any], workdir: Path, warm_serve: WarmInterpreter
) -> None:
    warm = warm_serve
    registry, onnx_cache = trained["registry"], trained["root"] / "onnx-cache"
    rng = random.Random(18)
    acked = Acknowledged()
    port = free_port()
    for cycle in range(CYCLES):
        replica = start_replica(warm, registry, workdir, port, onnx_cache)
        if cycle:  # every event acknowledged before the last kill is back, in log order
            state, logged = log_fold(replica.log)
            assert served_state(replica.url) == state
        stop = threading.Event()
        writer = threading.Thread(
            target=stream_events, args=(replica.url, ITEMS, stop, cycle, acked), daemon=True
        )
        writer.start()
        time.sleep(rng.uniform(0.3, 1.5))  # events stream in; snapshots come and go
        os.kill(replica.process.pid, signal.SIGKILL)
        replica.process.wait(timeout=30)
        writer.join(timeout=30)
        assert replica.process.returncode == -signal.SIGKILL
        assert not writer.is_alive()

    replica = start_replica(warm, registry, workdir, port, onnx_cache)
    state, logged = log_fold(replica.log)
    # Every acknowledged event is in the log, as acknowledged ...
    assert acked.events and all(logged[offset] == pair for offset, pair in acked.events.items())
    # ... and the restarted replica's state is the log's fold: all of them, in order.
    assert served_state(replica.url) == state
    # A clean stop writes the final snapshot; a restart from it alone replays nothing.
    replica.process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert replica.process.wait(timeout=60) in (0, -signal.SIGTERM)
    replica = start_replica(warm, registry, workdir, port, onnx_cache)
    ready = httpx.get(f"{replica.url}/readyz", timeout=5).json()
    assert ready["state_rebuild"]["events"] == 0
    assert ready["state_rebuild"]["applied_offset"] == max(logged)
    assert served_state(replica.url) == state


# ----------------------------------------------------------------------------------- online learner


def learner_command(registry: Path, events: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "recloop.cli", "online", "--registry", str(registry),
        "--event-log", str(events), "--run-dir", str(run_dir), "--threads", "1",
        "online.batch_events=64", "online.publish_every_events=256",
        "online.publish_every_seconds=0", "online.admit_after=2",
    ]  # fmt: skip


def learner_env(crash_at: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    return env


def test_kill_9_at_any_point_loses_nothing_and_applies_nothing_twice(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    events = pattern_events(500)
    events += [Event(str(u), "sku-new", 2e9 + u) for u in range(3)]
    events += pattern_events(200, seed=1)
    runs = {}
    for name in ("reference", "crashed"):
        shutil.copytree(trained["registry"], tmp_path / name / "registry")
        event_log(tmp_path / name / "events.db", events).close()
        runs[name] = learner_command(
            tmp_path / name / "registry", tmp_path / name / "events.db", tmp_path / name / "run"
        )
    output = tmp_path / "learner.log"
    # Every `recloop online` but the randomly killed one is forked from an interpreter that has
    # imported torch: the same process, without eight imports of torch and torch._dynamo.
    with warm_interpreter(["torch", "torch._dynamo"], learner_env()) as warm:

        def run_learner(crash_at: str | None = None) -> int:
            args, env = runs["crashed"][3:], learner_env(crash_at)
            return warm.start("recloop.cli", args, env, output).wait(timeout=120)

        # The uninterrupted run shares nothing with the crashed one: it runs alongside it.
        uninterrupted = warm.start("recloop.cli", runs["reference"][3:], learner_env(), output)
        # Crash between every pair of steps that matter, then once more at a random moment
        # (a process of its own, started cold, as a user starts it).
        for point in ("batch:3", "state-saved:1", "published:1", "committed:1", "batch:9"):
            assert run_learner(point) == -signal.SIGKILL, point
        quiet = subprocess.DEVNULL
        process = subprocess.Popen(runs["crashed"], stdout=quiet, stderr=quiet)
        time.sleep(random.Random(7).uniform(2.0, 4.0))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        assert run_learner() == 0
        assert uninterrupted.wait(timeout=120) == 0

    reference, crashed = (
        Registry(tmp_path / "reference/registry"),
        Registry(tmp_path / "crashed/registry"),
    )
    ref_versions = [(i.id, i.kind) for i in reference.list()]
    assert [(i.id, i.kind) for i in crashed.list()] == ref_versions  # no duplicate publish
    final = ref_versions[-1][0]
    ref_state, crash_state = state_of(reference, final), state_of(crashed, final)
    assert crash_state.offset == ref_state.offset == len(events)
    assert crash_state.totals == ref_state.totals and crash_state.totals.events == len(events)
    assert crash_state.admitted == ref_state.admitted and "sku-new" in crash_state.admitted
    # Optimizer and RNG state travel with each publish: the crashed run took the same steps.
    ref_tensors, crash_tensors = reference.load_tensors(final), crashed.load_tensors(final)
    for name, tensor in ref_tensors.items():
        assert torch.equal(crash_tensors[name], tensor), name
    for info in crashed.list():
        crashed.verify(info.id)  # every version complete and checksummed
    rows = pl.read_csv(tmp_path / "crashed/run" / CSV_NAME)
    assert rows.equals(pl.read_csv(tmp_path / "reference/run" / CSV_NAME))
    assert rows["events"].sum() == len(events)
    log = SqliteEventLog(tmp_path / "crashed/events.db")
    assert log.committed("online-learner") == len(events)


# ---------------------------------------------------------------------------------------- event log


def test_sqlite_acknowledged_appends_survive_kill_9(tmp_path: Path) -> None:
    path, size, kill_after = tmp_path / "events.db", 50, 15
    writer = start_writer(path, "w", batches=1_000_000, size=size)
    acked: list[tuple[int, int, int]] = []
    try:
        assert writer.stdout is not None
        for line in writer.stdout:
            acked.append(acknowledged(line))
            if len(acked) == kill_after:
                # The writer is most likely inside its next append: the kill tests atomicity too.
                os.kill(writer.pid, signal.SIGKILL)
                break
    finally:
        writer.kill()
        writer.communicate()
    assert writer.returncode == -signal.SIGKILL
    assert len(acked) == kill_after

    # WAL mode is a property of the file (synchronous=FULL is set per connection on open).
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()
    with SqliteEventLog(path) as log:
        logged = read_all(log, page=1000)
        check_dense_and_whole(logged, size)
        by_batch = batches_by_writer(logged)
        # Every acknowledged batch is there, exactly once, at the offsets it was given.
        for batch, first, last in acked:
            entries = by_batch["w", batch]
            assert (entries[0].offset, entries[-1].offset) == (first, last)
        # At most the batch in flight at the kill made it in on top of the acknowledged ones.
        assert len(by_batch) in (kill_after, kill_after + 1)
        # The log is usable after the crash and carries on densely.
        assert log.append(make_events(1)) == [str(len(logged) + 1)]


# -------------------------------------------------------------------------------------------- Redis


async def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        await asyncio.sleep(0.05)


def test_redis_outage_keeps_serving_and_replays_events(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    url = redis_server.url

    async def scenario(store: StateStore) -> None:
        await store.append_events([("u1", "a"), ("u1", "b"), ("u2", "x")])
        assert await store.get_sequences(["u1", "u2"]) == [["a", "b"], ["x"]]
        await store.set_cached("u2", "f", b"cached")

        redis_server.stop()
        assert await store.get_sequences(["u1", "u2"]) == [["a", "b"], ["x"]]  # last known
        await store.append_events([("u1", "c"), ("u3", "z")])
        assert await store.get_sequences(["u1", "u3"]) == [["a", "b", "c"], ["z"]]
        assert await store.get_cached("u2", "f") is None
        await store.set_cached("u2", "f", b"skipped")
        status = store.status()
        assert status["connected"] is False and status["pending"] == 2
        assert status["last_error"]

        started = time.perf_counter()
        for _ in range(50):
            await store.get_sequences(["u1"])
            await store.get_cached("u1", "f")
        assert time.perf_counter() - started < 1.0, "requests wait on Redis while it is down"
        assert len(state_records(caplog, logging.WARNING)) == 1

        redis_server.start()  # same port, empty: no persistence
        await wait_until(lambda: store.status()["connected"], timeout=10)
        status = store.status()
        assert status["pending"] == 0 and status["reconnects"] == 1
        assert len(state_records(caplog, logging.INFO)) == 1
        assert len(state_records(caplog, logging.WARNING)) == 1
        assert await redis_call(url, "LRANGE", "recloop:seq:u1", 0, -1) == [b"c"]
        assert await redis_call(url, "LRANGE", "recloop:seq:u3", 0, -1) == [b"z"]
        # Back to Redis as the source of truth, cache on again.
        assert await store.get_sequences(["u1"]) == [["c"]]
        await store.set_cached("u2", "f", b"again")
        assert await store.get_cached("u2", "f") == b"again"

    run(RedisStateStore(url, max_length=5), scenario)


def test_redis_down_at_start_starts_degraded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    server = RedisServer(tmp_path / "redis", port=free_port())

    async def scenario(store: StateStore) -> None:
        assert store.status()["connected"] is False
        await store.append_events([("u1", "a"), ("u1", "b")])
        await store.invalidate_all()  # deferred to the reconnect
        assert await store.get_sequences(["u1"]) == [["a", "b"]]
        server.start()
        await wait_until(lambda: store.status()["connected"], timeout=10)
        assert await redis_call(server.url, "LRANGE", "recloop:seq:u1", 0, -1) == [b"a", b"b"]
        assert len(state_records(caplog, logging.WARNING)) == 1

    try:
        run(RedisStateStore(server.url, backoff_initial=0.05, backoff_max=0.2), scenario)
    finally:
        server.stop()


def test_redis_backend_shares_state_and_survives_an_outage(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    user, _, _ = known_user(trained)
    with running_redis(tmp_path / "redis") as redis_server:
        config = config_for(trained, state_url=redis_server.url)
        with running_service(config) as first, running_service(config) as second:
            # An event posted to one replica changes what the other one recommends.
            before = httpx.get(f"{second}/v1/users/{user}/recommendations", params={"k": 5})
            top = before.json()["items"][0]["item_id"]
            event = {"events": [{"user_id": user, "item_id": top}]}
            posted = httpx.post(f"{first}/v1/events", json=event, headers={"X-API-Key": API_KEY})
            assert posted.status_code == 200
            after = httpx.get(f"{second}/v1/users/{user}/recommendations", params={"k": 5}).json()
            assert after["cached"] is False
            assert top not in [item["item_id"] for item in after["items"]]

            redis_server.stop()  # Redis goes away mid-run: answers continue, state as last known
            during = httpx.get(f"{second}/v1/users/{user}/recommendations", params={"k": 5})
            assert during.status_code == 200
            assert top not in [item["item_id"] for item in during.json()["items"]]
            # Not ready, so a balancer sends users elsewhere: /readyz says 503 and why, and a
            # request that asks for a ready replica (nginx's header) is refused at once.
            ready = httpx.get(f"{second}/readyz")
            assert ready.status_code == 503
            body = ready.json()
            assert body["ready"] is False and body["state"]["connected"] is False
            assert "state store (Redis) is unreachable" in body["reason"]
            gated = httpx.get(
                f"{second}/v1/users/{user}/recommendations", headers={REQUIRE_READY: "1"}
            )
            assert gated.status_code == 503 and "replica not ready" in gated.json()["detail"]
            assert gated.headers["retry-after"] == "1"

            redis_server.start()  # back (empty): ready again once the store reconnects
            deadline = time.monotonic() + 10
            while httpx.get(f"{second}/readyz").status_code != 200:
                assert time.monotonic() < deadline, "not ready again after Redis came back"
                time.sleep(0.05)
            gated = httpx.get(
                f"{second}/v1/users/{user}/recommendations", headers={REQUIRE_READY: "1"}
            )
            assert gated.status_code == 200
