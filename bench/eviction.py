"""Bounded item tables under an unbounded id stream (issue 23 part 1): memory and quality.

A synthetic stream whose popular items drift: the hot window, W = `--window` ids, moves by
W / 2 per phase from item 1 to item `--distinct`, so every id is popular for two phases and
then never seen again. Each user draws from their topic's span of the window (Zipf-ranked),
plus `--noise` one-off ids from the whole range. A tiny SASRec is trained
on the window's starting position, then `recloop online` learns the stream in four
configurations, each its own process:

- bounded-lru: online.max_items = `--rows`, least recently seen rows evicted;
- bounded-decayed: the same, lowest time-decayed frequency evicted, decayed admission;
- unbounded: no max_items (the table grows with every admitted id);
- frozen-when-full: max_items = `--rows` and a TTL longer than the stream: nothing is ever
  evicted, so once the table is full new ids are never admitted (no eviction).

Recorded per configuration: the learner's RSS over the stream (sampled from /proc), the
prequential HR@10 (each event ranked before it is learned) in windows and overall, the final
table size, evictions and events/s. Writes bench/results/eviction<-tag>.json and .png.

The issue's size, 10M distinct ids through a 100k-row table, takes hours here (the learner
does ~1,000 events/s on 2 cores); the default is a scaled configuration:

    .venv/bin/python bench/eviction.py                  # scaled (see --help for the sizes)
    .venv/bin/python bench/eviction.py --events 30000000 --distinct 10000000 --rows 100000 \\
        --users 200000 --tag full                       # the issue's size
    .venv/bin/python bench/eviction.py --table          # the table of the last result
"""

from __future__ import annotations

import argparse
import csv
import itertools
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, RESULTS, write_result

RECLOOP = [sys.executable, "-m", "recloop.cli"]
WORK = REPO / "runs" / "bench-eviction"
MODEL = {"type": "sasrec", "dim": 32, "num_blocks": 1, "num_heads": 1, "dropout": 0.0}
# Every configuration learns with the same settings; only the table policy differs.
LEARNER = [
    "online.loss=sampled_softmax", "online.num_negatives=256", "online.context_negatives=0",
    "online.score_frozen=false", "online.replay_windows=16", "online.batch_events=256",
    "online.publish_every_events=5000", "online.publish_every_seconds=0", "online.admit_after=2",
    "online.embedding_lr=0.03",
]  # fmt: skip


def configurations(rows: int, events: int) -> dict[str, list[str]]:
    bounded = [f"online.max_items={rows}"]
    half_life = f"online.decay_half_life={max(1000, events // 100)}"
    return {
        "bounded-lru": [*bounded, "online.evict=lru"],
        "bounded-decayed": [*bounded, "online.evict=decayed", "online.admit=decayed", half_life],
        "unbounded": [],
        "frozen-when-full": [*bounded, f"online.evict_ttl={events + 1}"],
    }


# ----------------------------------------------------------------------------- the stream


def stream(
    events: int, distinct: int, window: int, users: int, noise: float, seed: int, start: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, item ids) of `events` events; `start` > 0 pins the window at item 1 (the
    training data: the stream's past). The window moves by half its width per phase, so an
    id is hot for two phases; inside it each user's topic has its own Zipf-ranked span."""
    rng = np.random.default_rng(seed)
    topics = 8
    span = max(1, window // topics)
    shift = max(1, window // 2)
    phases = max(1, (distinct - window) // shift + 1)
    t = np.arange(events, dtype=np.int64)
    center = np.zeros(events, np.int64) if start else (t * phases // max(events, 1)) * shift
    user = rng.integers(0, users, size=events)
    rank = np.minimum(rng.zipf(1.3, size=events) - 1, span - 1)
    item = center + (user % topics) * span + rank + 1
    tail = rng.random(events) < noise
    item[tail] = rng.integers(1, distinct + 1, size=int(tail.sum()))
    return user, item


def past_dataset(args: argparse.Namespace, out: Path) -> None:
    from recloop.data.prepare import prepare, with_source_order

    user, item = stream(20 * args.users, args.distinct, args.window, args.users, 0.0, 1, start=1)
    frame = pl.DataFrame(
        {"user": user, "item": item, "timestamp": np.arange(len(user), dtype=np.int64)}
    )
    shutil.rmtree(out, ignore_errors=True)
    prepare(with_source_order([frame]), {"kind": "bench-eviction"}, out)


def base_registry(args: argparse.Namespace) -> Path:
    from recloop.config import config_from_dict
    from recloop.train.trainer import train

    data, registry = WORK / "data", WORK / "registry"
    shutil.rmtree(registry, ignore_errors=True)
    past_dataset(args, data)
    train_config = {
        "batch_size": 128, "max_length": 20, "lr": 3e-3, "warmup_steps": 10, "loss":
        "sampled_softmax", "max_steps": args.train_steps, "eval_every_steps": args.train_steps,
    }  # fmt: skip
    config = config_from_dict({"model": MODEL, "train": train_config})
    train(config, data, WORK / "train", registry_dir=registry, show_progress=False)
    return registry


def event_log(args: argparse.Namespace, path: Path) -> None:
    from recloop.events import Event, SqliteEventLog

    user, item = stream(args.events, args.distinct, args.window, args.users, args.noise, 2)
    log = SqliteEventLog(path)
    chunk = 100_000
    for start in range(0, len(user), chunk):
        users, items = user[start : start + chunk].tolist(), item[start : start + chunk].tolist()
        log.append(
            [
                Event(str(u), str(i), 2e9 + start + n)
                for n, (u, i) in enumerate(zip(users, items, strict=True))
            ]
        )


# ----------------------------------------------------------------------------- one learner


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def last_offset(csv_path: Path) -> int:
    """The offset of the last prequential row written (0 before the first)."""
    try:
        with csv_path.open("rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - 512))
            last = handle.read().decode(errors="replace").strip().splitlines()[-1]
        return int(last.split(",")[0])
    except (OSError, IndexError, ValueError):
        return 0


def learn(name: str, overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(WORK / "registry", work / "registry")
    event_log(args, work / "events.db")  # the same stream for each (seeded)
    command = [
        *RECLOOP, "online", "--registry", str(work / "registry"), "--event-log",
        str(work / "events.db"), "--run-dir", str(work / "run"), "--threads", str(args.threads),
        *LEARNER, *overrides,
    ]  # fmt: skip
    started = time.perf_counter()
    samples: list[tuple[float, int, float]] = []  # (seconds, offset, RSS MB)
    with (work / "learner.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            rss = rss_mb(process.pid)
            if rss is not None:
                offset = last_offset(work / "run" / "prequential.csv")
                samples.append((round(time.perf_counter() - started, 2), offset, round(rss, 1)))
            time.sleep(args.sample_seconds)
    if process.returncode != 0:
        raise SystemExit(f"{name}: recloop online failed, see {work / 'learner.log'}")
    seconds = time.perf_counter() - started
    return {"overrides": overrides, "seconds": round(seconds, 1), **outcome(work, samples, args)}


def outcome(work: Path, samples: list[tuple[float, int, float]], args: argparse.Namespace) -> Any:
    from recloop.registry import Registry

    with (work / "run" / "prequential.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    offsets = np.array([int(r["offset"]) for r in rows])
    scored = np.array([int(r["scored"]) for r in rows])
    hits = np.array([int(r["hits_online"]) for r in rows])
    edges = np.linspace(0, args.events, args.windows + 1)
    windows = []
    for lo, hi in itertools.pairwise(edges):
        inside = (offsets > lo) & (offsets <= hi)
        windows.append(round(float(hits[inside].sum() / max(scored[inside].sum(), 1)), 4))
    manifest = Registry(work / "registry").manifest("latest")
    online = manifest.training.get("online") or {}
    rss = [s[2] for s in samples]
    half = [s[2] for s in samples if s[1] >= args.events // 2] or rss
    return {
        "HR@10": round(float(hits.sum() / max(scored.sum(), 1)), 4),
        "HR@10_last_quarter": round(float(np.mean(windows[-max(1, args.windows // 4) :])), 4),
        "HR@10_windows": windows,
        "events_per_second": round(args.events / max(samples[-1][0], 1e-9), 1) if samples else None,
        "final_items": int(manifest.model["num_items"]),
        "admitted_now": len(online.get("admitted") or {}),
        "rss_mb_peak": max(rss) if rss else None,
        "rss_mb_second_half_min_max": [min(half), max(half)] if half else None,
        "rss_samples": samples,
    }


# ----------------------------------------------------------------------------- output


def plot(results: dict[str, Any], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, quality) = plt.subplots(1, 2, figsize=(12, 4.5))
    edges = np.linspace(0, args.events, args.windows + 1)
    middles = (edges[:-1] + edges[1:]) / 2
    for name, result in results.items():
        samples = np.array(result["rss_samples"], dtype=np.float64).reshape(-1, 3)
        memory.plot(samples[:, 1], samples[:, 2], label=name)
        quality.plot(middles, result["HR@10_windows"], label=f"{name} ({result['HR@10']:.3f})")
    memory.set(xlabel="events", ylabel="learner RSS (MB)", title="memory over the stream")
    quality.set(xlabel="events", ylabel="prequential HR@10", title="HR@10 per window")
    for axes in (memory, quality):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(
        f"{args.distinct:,} distinct ids, {args.events:,} events, {args.rows:,}-row table"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def table(path: Path) -> str:
    """The result file as a markdown table (figures are copied from this, never typed)."""
    import json

    data = json.loads(path.read_text())
    config = data["config"]
    lines = [
        f"{path.name}: {config['distinct']:,} distinct ids, {config['events']:,} events, "
        f"{config['rows']:,}-row table (commit {data['commit'][:10]})",
        "",
        "| configuration | items at end | peak RSS MB | RSS MB, 2nd half (min-max) "
        "| HR@10 | HR@10 last quarter | events/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in data["results"].items():
        low, high = r["rss_mb_second_half_min_max"]
        lines.append(
            f"| {name} | {r['final_items']:,} | {r['rss_mb_peak']:.0f} | {low:.0f}-{high:.0f} "
            f"| {r['HR@10']:.4f} | {r['HR@10_last_quarter']:.4f} | {r['events_per_second']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--distinct", type=int, default=250_000)
    parser.add_argument("--rows", type=int, default=10_000, help="online.max_items")
    parser.add_argument("--window", type=int, default=None, help="hot ids (default rows / 2)")
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--noise", type=float, default=0.1, help="share of one-off random ids")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=20, help="HR@10 windows over the stream")
    parser.add_argument("--sample-seconds", type=float, default=1.0)
    parser.add_argument("--configs", nargs="*", default=None, help="names (default: all)")
    parser.add_argument("--tag", default="", help="result file eviction<-tag>.json")
    parser.add_argument("--table", action="store_true", help="print the result's table, no run")
    args = parser.parse_args()
    name = "eviction" + (f"-{args.tag}" if args.tag else "")
    if args.table:
        print(table(RESULTS / f"{name}.json"))
        return
    args.window = args.window or args.rows // 2
    started = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    base_registry(args)
    chosen = configurations(args.rows, args.events)
    results = {}
    for config_name in args.configs or list(chosen):
        print(f"{config_name}: learning {args.events:,} events", flush=True)
        results[config_name] = learn(config_name, chosen[config_name], args)
        print(f"{config_name}: HR@10 {results[config_name]['HR@10']}", flush=True)
    config = {k: v for k, v in vars(args).items() if k not in ("table", "configs")}
    config.update(model=MODEL, learner=LEARNER, configurations=chosen)
    path = write_result(name, config, results, started)
    plot(results, RESULTS / f"{name}.png", args)
    print(table(path))


if __name__ == "__main__":
    main()
