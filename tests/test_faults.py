"""Fault injection with real processes: SIGKILL of `recloop serve` while events stream in.

The promise under test: a replica killed at any moment and restarted answers every user with
every event it acknowledged. Each cycle starts `recloop serve` (in-process state, SQLite event
log, a snapshot every 0.3 s), streams ``POST /v1/events`` from a client thread, kills the
process with SIGKILL at a random moment (seeded), restarts it with the same flags and compares
``GET /v1/users/{id}/events`` for every user against the fold of the event log, which must hold
every acknowledged event. Bounded: a few cycles, each with a deadline.

The other fault tests live beside the code they break: the learner under kill -9 at every
publish step (tests/test_online.py), the SQLite log under kill -9 (tests/test_events.py), Redis
lost under load (tests/test_state.py, tests/test_serve.py). This file adds the serving replica.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from recloop.online.events import SqliteEventLog
from recloop.serve.server import free_port
from tests.serving import make_dataset, train_version

API_KEY = "fault-key"
USERS = [f"fault-user-{n}" for n in range(12)]
CYCLES = 3


@dataclass
class Acknowledged:
    """Events the service answered 200 to, by event id (the log offset)."""

    events: dict[int, tuple[str, str]] = field(default_factory=dict)
    failed: int = 0  # requests cut off by the kill: not acknowledged, may or may not be stored


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[str]]:
    root = tmp_path_factory.mktemp("faults")
    data = make_dataset(root / "data")
    registry = root / "registry"
    train_version(data, registry, root / "run", seed=3, steps=10)
    items = [str(n) for n in range(1, 60)]
    return registry, "latest", items


@dataclass
class Replica:
    process: subprocess.Popen[bytes]
    url: str
    log: Path


def start_replica(registry: Path, workdir: Path, port: int) -> Replica:
    command = [
        sys.executable,
        "-m",
        "recloop.cli",
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
        str(workdir / "onnx-cache"),
        "--no-cache",
    ]
    env = {**os.environ, "RECLOOP_API_KEY": API_KEY}
    with (workdir / "serve.log").open("ab") as output:  # the child keeps its own descriptor
        process = subprocess.Popen(command, env=env, stdout=output, stderr=output)
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
    log = tmp_path / "serve.log"
    if log.exists() and os.environ.get("RECLOOP_SHOW_FAULT_LOGS"):
        sys.stderr.write(log.read_text(errors="replace"))


@pytest.mark.slow
def test_serve_killed_at_random_moments_keeps_every_acknowledged_event(
    version: tuple[Path, str, list[str]], workdir: Path
) -> None:
    registry, _, items = version
    rng = random.Random(18)
    acked = Acknowledged()
    port = free_port()
    for cycle in range(CYCLES):
        replica = start_replica(registry, workdir, port)
        if cycle:  # every event acknowledged before the last kill is back, in log order
            state, logged = log_fold(replica.log)
            assert served_state(replica.url) == state
        stop = threading.Event()
        writer = threading.Thread(
            target=stream_events, args=(replica.url, items, stop, cycle, acked), daemon=True
        )
        writer.start()
        time.sleep(rng.uniform(0.3, 1.5))  # events stream in; snapshots come and go
        os.kill(replica.process.pid, signal.SIGKILL)
        replica.process.wait(timeout=30)
        writer.join(timeout=30)
        assert replica.process.returncode == -signal.SIGKILL
        assert not writer.is_alive()

    replica = start_replica(registry, workdir, port)
    try:
        state, logged = log_fold(replica.log)
        # Every acknowledged event is in the log, as acknowledged ...
        assert acked.events and all(logged[offset] == pair for offset, pair in acked.events.items())
        # ... and the restarted replica's state is the log's fold: all of them, in order.
        assert served_state(replica.url) == state
        # A clean stop writes the final snapshot; a restart from it alone replays nothing.
        replica.process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert replica.process.wait(timeout=60) in (0, -signal.SIGTERM)
        replica = start_replica(registry, workdir, port)
        ready = httpx.get(f"{replica.url}/readyz", timeout=5).json()
        assert ready["state_rebuild"]["events"] == 0
        assert ready["state_rebuild"]["applied_offset"] == max(logged)
        assert served_state(replica.url) == state
    finally:
        replica.process.kill()
        replica.process.wait(timeout=30)
