"""How long a serving replica takes to rebuild its in-process user state from the event log.

For each log size: write N synthetic events to a SQLite event log (users ~ N/20, 100k items),
then measure, through the service's own code (``MemoryStateStore`` + ``LoggedState``):

* ``full``: a replica with no snapshot replays the whole log (the worst case, a first start);
* ``snapshot``: the time to write the periodic snapshot of that state (off the event loop);
* ``restart``: what a replica killed after the snapshot does at start: load the snapshot, then
  replay the tail appended after it (``--tail-fraction`` of N).

    .venv/bin/python bench/state_rebuild.py --events 1000000 10000000

Writes bench/results/state_rebuild.json and .png. Run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, write_result
from recloop.events import Event, SqliteEventLog
from recloop.serve.state.memory import MemoryStateStore
from recloop.serve.state.sync import LoggedState

BATCH = 100_000  # events per append while the log is written
ITEMS = 100_000
MAX_LENGTH = 200  # recloop serve's default state_max_length


def write_log(log: SqliteEventLog, count: int, users: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    written = 0
    while written < count:
        size = min(BATCH, count - written)
        user_ids = rng.integers(0, users, size=size).tolist()
        item_ids = rng.zipf(1.2, size=size) % ITEMS
        now = time.time()
        log.append(
            [
                Event(f"user-{u}", f"item-{i}", now)
                for u, i in zip(user_ids, item_ids.tolist(), strict=True)
            ]
        )
        written += size
        rate = written / (time.perf_counter() - started)
        eta = (count - written) / rate
        print(
            f"\r  writing the log: {written:,}/{count:,} ({rate:,.0f}/s, ETA {eta:.0f} s)", end=""
        )
    print()
    return time.perf_counter() - started


async def rebuild(
    log: SqliteEventLog, snapshot: Path | None
) -> tuple[MemoryStateStore, dict[str, Any]]:
    """A replica's start: load the snapshot (if any), replay the log after it, until ready."""
    started = time.perf_counter()
    store = MemoryStateStore(max_length=MAX_LENGTH, snapshot_path=snapshot)
    store.load_snapshot()
    loaded = time.perf_counter() - started
    executor = ThreadPoolExecutor(max_workers=1)
    sync = LoggedState(store, log, executor, tail_seconds=None)
    sync.check_snapshot()
    await store.start()
    progress = await sync.rebuild()
    executor.shutdown()
    seconds = time.perf_counter() - started
    return store, {
        "seconds": round(seconds, 3),
        "snapshot_load_seconds": round(loaded, 3),
        "replayed_events": progress.events,
        "replay_events_per_second": round(progress.events / max(progress.seconds(), 1e-9)),
        "users": store.status()["users"],
        "rss_gib": round(psutil.Process().memory_info().rss / 2**30, 2),
    }


async def measure(count: int, workdir: Path, tail_fraction: float) -> dict[str, Any]:
    users = max(count // 20, 1)
    log = SqliteEventLog(workdir / "events.sqlite")
    result: dict[str, Any] = {"events": count, "users": users}
    result["log_write_seconds"] = round(write_log(log, count, users, seed=count), 2)
    result["log_bytes"] = (workdir / "events.sqlite").stat().st_size

    store, result["full"] = await rebuild(log, None)
    print(f"  full rebuild: {result['full']}")
    snapshot = workdir / "state.jsonl"
    store.snapshot_path = snapshot
    started = time.perf_counter()
    await store.snapshot(force=True)
    result["snapshot"] = {
        "write_seconds": round(time.perf_counter() - started, 3),
        "bytes": snapshot.stat().st_size,
    }
    print(f"  snapshot: {result['snapshot']}")
    del store

    tail = int(count * tail_fraction)
    write_log(log, tail, users, seed=count + 1)
    _, result["restart"] = await rebuild(log, snapshot)
    result["restart"]["tail_events"] = tail
    print(f"  restart from the snapshot + {tail:,} events: {result['restart']}")
    log.close()
    return result


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{row['events'] / 1e6:g}M events" for row in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    full = [row["full"]["seconds"] for row in rows]
    restart = [row["restart"]["seconds"] for row in rows]
    snap = [row["snapshot"]["write_seconds"] for row in rows]
    ax.bar(x - 0.27, full, 0.27, label="rebuild from the whole log")
    ax.bar(x, restart, 0.27, label="restart: snapshot + 1% tail")
    ax.bar(x + 0.27, snap, 0.27, label="write the snapshot")
    ax.set_xticks(x, labels)
    ax.set_ylabel("seconds")
    ax.set_yscale("log")
    ax.set_title("In-process user state: rebuild at start (SQLite event log)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--tail-fraction", type=float, default=0.01)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    rows = []
    for count in args.events:
        workdir = Path(tempfile.mkdtemp(prefix="recloop-rebuild-", dir=args.workdir))
        try:
            print(f"{count:,} events")
            rows.append(asyncio.run(measure(count, workdir, args.tail_fraction)))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    config = {
        "events": args.events,
        "tail_fraction": args.tail_fraction,
        "max_length": MAX_LENGTH,
        "users": "events // 20",
        "items": ITEMS,
        "log": "sqlite",
    }
    path = write_result("state_rebuild", config, rows, started)
    plot(rows, RESULTS / "state_rebuild.png")
    print(f"wrote {path} and {RESULTS / 'state_rebuild.png'}")


if __name__ == "__main__":
    main()
