"""The online learner under torchrun (online.sharding = "row_wise"): 2 gloo processes share
the stream and a sharded item table, and a SIGKILL of either process at any step loses no
event and applies none twice: the restarted run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchrec", reason="needs the recloop[sharded] extra (make setup has it)")

from recloop.events import Event, SqliteEventLog
from recloop.online.control import CRASH_ENV, CRASH_RANK_ENV
from recloop.online.sharded import owner
from recloop.registry import Registry
from tests.online_helpers import event_log, pattern_events, state_of


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def learner(root: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_port", str(_port()), "-m", "recloop.cli", "online",
        "--registry", str(root / "registry"), "--event-log", str(root / "events.db"),
        "--run-dir", str(root / "run"), "--threads", "1",
        "online.batch_events=64", "online.publish_every_events=256",
        "online.publish_every_seconds=0", "online.admit_after=2", "online.sharding='row_wise'",
    ]  # fmt: skip


def environment(crash_at: str | None = None, rank: int | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    env.pop(CRASH_ENV, None)
    env.pop(CRASH_RANK_ENV, None)
    if crash_at is not None:
        env[CRASH_ENV], env[CRASH_RANK_ENV] = crash_at, str(rank)
    return env


def test_users_are_split_between_processes_the_same_way_every_time() -> None:
    owners = [owner(str(user), 2) for user in range(300)]
    assert owners == [owner(str(user), 2) for user in range(300)]
    assert 100 < sum(owners) < 200  # both processes get a fair share


def test_two_processes_killed_at_any_step_lose_nothing_and_apply_nothing_twice(
    base: tuple[Path, Path, str], tmp_path: Path
) -> None:
    events = pattern_events(500)
    events += [Event(str(u), "sku-new", 2e9 + u) for u in range(3)]
    events += pattern_events(200, seed=1)
    for name in ("reference", "crashed"):
        shutil.copytree(base[1], tmp_path / name / "registry")
        event_log(tmp_path / name / "events.db", events).close()
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, env: dict[str, str], tag: str) -> subprocess.Popen[bytes]:
        with open(logs / f"{tag}.log", "wb") as out:  # the child keeps its own descriptor
            return subprocess.Popen(learner(tmp_path / name), stdout=out, stderr=out, env=env)

    uninterrupted = start("reference", environment(), "reference")
    # A SIGKILL of one process (rank 1 mid-batch, then rank 0 between publishing a version
    # and committing its offset), then a clean restart.
    for point, rank in (("batch:3", 1), ("published:1", 0)):
        crashed = start("crashed", environment(point, rank), f"{point}-{rank}")
        assert crashed.wait(timeout=300) != 0, point
        text = (logs / f"{point}-{rank}.log").read_text()
        assert "exitcode: -9" in text, text[-2000:]  # torchrun saw the SIGKILL and stopped all
    assert start("crashed", environment(), "final").wait(timeout=300) == 0
    assert uninterrupted.wait(timeout=300) == 0, (logs / "reference.log").read_text()[-2000:]

    reference, crashed_registry = (
        Registry(tmp_path / "reference/registry"),
        Registry(tmp_path / "crashed/registry"),
    )
    versions = [(i.id, i.kind) for i in reference.list()]
    assert [(i.id, i.kind) for i in crashed_registry.list()] == versions  # no duplicate publish
    final = versions[-1][0]
    ref_state, crash_state = state_of(reference, final), state_of(crashed_registry, final)
    assert crash_state.offset == ref_state.offset == len(events)
    assert crash_state.totals == ref_state.totals and crash_state.totals.events == len(events)
    assert crash_state.totals.scored <= len(events)  # each event scored once, by its owner
    assert crash_state.admitted == ref_state.admitted and "sku-new" in crash_state.admitted
    ref_tensors, crash_tensors = reference.load_tensors(final), crashed_registry.load_tensors(final)
    for name, tensor in ref_tensors.items():
        assert torch.equal(crash_tensors[name], tensor), name
    table = ref_tensors["item_embedding.weight"]
    assert table.shape[0] == 120 + 2  # 120 items, padding, and the admitted one (no headroom)
    for info in crashed_registry.list():
        crashed_registry.verify(info.id)
    manifest = reference.manifest(final).to_json()
    assert manifest["training"]["world_size"] == 2
    assert manifest["training"]["sharding"]["type"] == "row_wise"
    log = SqliteEventLog(tmp_path / "crashed/events.db")
    assert log.committed("online-learner") == len(events)


def test_a_learner_under_torchrun_without_a_sharded_table_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from recloop.cli.online import _distributed
    from recloop.errors import ConfigError
    from recloop.online.config import OnlineConfig

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"under torchrun needs online.sharding='row_wise'"):
        _distributed("none")
    with pytest.raises(ConfigError, match=r"online.sharding must be 'none' or 'row_wise'"):
        OnlineConfig(sharding="column_wise")  # type: ignore[arg-type]
