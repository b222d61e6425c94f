"""Prequential HR@10 of the online learner vs the frozen model on a replayed Amazon Beauty stream.

Beauty (S3-Rec format) keeps each user's items in time order but no timestamps, so "time" here
is the position within the user's sequence: the first 80% of every user's items (at least 4 of
them) form the training set, and the remaining items are the stream, ordered by their relative
position (j / length) across users, so early-in-history events of all users come first. Items
that never occur in the training part are new items: they join the vocabulary online.

1. `recloop prepare` + `recloop train` (configs/beauty/sasrec.toml, --max-minutes) on the 80%.
2. `recloop ingest` the stream into a SQLite event log.
3. `recloop online` over it (test-then-train: each event scored by both models first).

Each learner setting (SETTINGS, or --settings) replays the whole stream from the same base
model. Writes bench/results/online_replay[-TAG].json (per setting: events/s, prequential HR@10,
the learner's time per phase from RUN/timings.json), online_replay[-TAG].png (HR@10 against
events/s) and one prequential plot per setting.

    .venv/bin/python bench/online_replay.py --train-steps 1923 [--settings NAME ...] [--tag T]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, RESULTS, SHARED_DATA, write_result
from bench.serve import run

RECLOOP = [sys.executable, "-m", "recloop.cli"]
WORK = REPO / "runs" / "bench-online-replay"
SOURCE = SHARED_DATA / "amazon-beauty-iclrec" / "Beauty.txt"
PAST_FRACTION = 0.8


def split_stream(source: Path, past: Path, stream: Path) -> dict[str, int]:
    """Writes the training part (S3-Rec lines) and the stream (JSON lines, in stream order)."""
    events: list[tuple[float, int, str, str]] = []
    past_items: set[str] = set()
    users = 0
    with source.open() as lines, past.open("w") as out:
        for line in lines:
            user, *items = line.split()
            cut = max(4, math.floor(PAST_FRACTION * len(items)))
            out.write(" ".join([user, *items[:cut]]) + "\n")
            past_items.update(items[:cut])
            users += 1
            for j in range(cut, len(items)):
                events.append((j / len(items), int(user), user, items[j]))
    events.sort()
    with stream.open("w") as out:
        for position, (_, _, user, item) in enumerate(events):
            out.write(json.dumps({"user_id": user, "item_id": item, "timestamp": position}) + "\n")
    new_items = {item for *_, item in events} - past_items
    return {
        "users": users,
        "stream_events": len(events),
        "stream_events_on_new_items": sum(1 for *_, item in events if item in new_items),
        "new_items": len(new_items),
    }


# Learner settings compared on the same stream and base model: (name, online.key=value ...),
# each spelled out in full so that it does not move with the defaults. "before-20" is the
# learner as issue 20 found it: the full softmax on every position of every window, 256-event
# micro-batches, two steps each, fp32. "new-only" learns only the micro-batch's new events'
# positions (and each replay window's last); "context-2k" adds every other position with a
# 2,048-negative sampled softmax in the same encoder pass (the default after stop 28); "fast"
# takes one step per 1,024 events. "default" is today's default: context-2k with 64 replay
# windows instead of 128 and twice the learning rates, picked on the first 24,000 events
# (--max-events 24000 --tag lr-validation); "default-nofrozen" the same without scoring the
# frozen model, and
# "context-half" the same learning half the older positions per step (online.context_fraction).
_BEFORE = [
    "online.replay_windows=128", "online.replay_positions=1", "online.lr=0.0005",
    "online.embedding_lr=0.001", "online.bf16=false", "online.context_fraction=1",
]  # fmt: skip
_COMMON = [*_BEFORE, "online.score_frozen=true"]
_DEFAULT = [
    "online.train_positions=new", "online.context_negatives=2048", "online.batch_events=256",
    "online.steps_per_batch=2", "online.replay_windows=64", "online.replay_positions=1",
    "online.lr=0.001", "online.embedding_lr=0.002", "online.bf16=false",
    "online.context_fraction=1",
]  # fmt: skip
SETTINGS: dict[str, list[str]] = {
    "before-20": [
        "online.train_positions=all", "online.context_negatives=0", "online.batch_events=256",
        "online.steps_per_batch=2", *_COMMON,
    ],
    "new-only": [
        "online.train_positions=new", "online.context_negatives=0", "online.batch_events=256",
        "online.steps_per_batch=2", *_COMMON,
    ],
    "context-2k": [
        "online.train_positions=new", "online.context_negatives=2048",
        "online.batch_events=256", "online.steps_per_batch=2", *_COMMON,
    ],
    "fast": [
        "online.train_positions=new", "online.context_negatives=0", "online.batch_events=1024",
        "online.steps_per_batch=1", *_COMMON,
    ],
    "fast-nofrozen": [
        "online.train_positions=new", "online.context_negatives=0", "online.batch_events=1024",
        "online.steps_per_batch=1", *_BEFORE, "online.score_frozen=false",
    ],
    "default": [*_DEFAULT, "online.score_frozen=true"],
    "default-nofrozen": [*_DEFAULT, "online.score_frozen=false"],
    "context-half": [
        *_DEFAULT[:-1], "online.context_fraction=0.5", "online.score_frozen=false"
    ],
}  # fmt: skip
# The learner under torchrun with its item table sharded (issue 21), next to "context-2k":
# the same learning, with online.sharding = "row_wise", in 1 process and in 2.
SETTINGS["sharded-1p"] = [*SETTINGS["context-2k"], "online.sharding=row_wise"]
SETTINGS["sharded-2p"] = [*SETTINGS["context-2k"], "online.sharding=row_wise"]
PROCESSES = {"sharded-1p": 1, "sharded-2p": 2}  # torchrun processes (the rest: plain recloop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-minutes", type=float, default=6.0)
    parser.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="train the base model for exactly this many steps (the same model on any machine) "
        "instead of --train-minutes",
    )
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--base-only", action="store_true", help="stop after the base model")
    parser.add_argument(
        "--settings",
        nargs="*",
        default=None,
        help=f"names from {sorted(SETTINGS)} (default: all), or NAME=key=value,key=value",
    )
    parser.add_argument("--max-events", type=int, default=None, help="stop each learner early")
    parser.add_argument("--threads", type=int, default=2, help="the learner's --threads")
    parser.add_argument("--tag", default="", help="result file online_replay<-tag>.json")
    parser.add_argument("--table", action="store_true", help="print the result's table, no run")
    args = parser.parse_args()
    if args.table:
        print(table(RESULTS / ("online_replay" + (f"-{args.tag}" if args.tag else "") + ".json")))
        return
    if not SOURCE.is_file():
        raise SystemExit(f"{SOURCE} is absent: this benchmark needs Amazon Beauty")
    started = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    name = "online_replay" + (f"-{args.tag}" if args.tag else "")
    log = RESULTS / f"{name}.log"
    log.unlink(missing_ok=True)
    data, registry = WORK / "data", WORK / "registry"
    stream = WORK / "stream.jsonl"
    split = split_stream(SOURCE, WORK / "past.txt", stream)
    print(f"split: {split}", flush=True)
    if args.retrain or not (registry / "versions").is_dir():
        shutil.rmtree(registry, ignore_errors=True)
        run([*RECLOOP, "prepare", "--format", "s3rec", "--input", str(WORK / "past.txt"),
             "--out", str(data), "--overwrite"], log)  # fmt: skip
        budget = ["--max-minutes", str(args.train_minutes)]
        if args.train_steps is not None:
            budget = [f"train.max_steps={args.train_steps}"]
        run([*RECLOOP, "train", "--config", str(REPO / "configs/beauty/sasrec.toml"),
             "--data", str(data), "--registry", str(registry), "--run-dir", str(WORK / "run"),
             *budget], log)  # fmt: skip
    if args.base_only:
        return
    events = WORK / "events.sqlite"
    for path in (events, *WORK.glob("events.sqlite-*")):
        path.unlink(missing_ok=True)
    run([*RECLOOP, "ingest", str(stream), "--event-log", str(events)], log)
    settings = chosen_settings(args.settings)
    rows = {}
    for label, overrides in settings.items():
        rows[label] = replay(label, overrides, registry, events, log, args)
        print(f"{label}: {json.dumps(rows[label]['summary'])}", flush=True)

    from recloop.registry import Registry

    base = Registry(registry).manifest("v000001").to_json()
    results = {
        "split": split,
        "base_model": {
            "version": "v000001",
            "test_metrics_on_80pct": {
                k: v for k, v in (base.get("metrics") or {}).items() if k.startswith("test/")
            },
            "training": {k: base["training"].get(k) for k in ("stopped_by", "steps", "epochs")},
        },
        "settings": rows,
    }
    config = {
        "dataset": "amazon-beauty-iclrec/Beauty.txt",
        "past_fraction": PAST_FRACTION,
        "train_config": "configs/beauty/sasrec.toml",
        "train_minutes": None if args.train_steps is not None else args.train_minutes,
        "train_steps": args.train_steps,
        "learner_threads": args.threads,
        "max_events": args.max_events,
        "settings": settings,
    }
    path = write_result(name, config, results, started)
    plot_settings(rows, RESULTS / f"{name}.png")
    for label in rows:
        shutil.copy(WORK / f"online-{label}" / "prequential.png", RESULTS / f"{name}-{label}.png")
    print(f"wrote {path}")


def chosen_settings(names: list[str] | None) -> dict[str, list[str]]:
    if not names:
        return dict(SETTINGS)
    chosen = {}
    for item in names:
        label, sep, spec = item.partition("=")
        if sep:
            chosen[label] = [f"online.{kv}" for kv in spec.split(",") if kv]
        elif item in SETTINGS:
            chosen[item] = SETTINGS[item]
        else:
            raise SystemExit(f"unknown setting {item!r}: known {sorted(SETTINGS)} or NAME=k=v,...")
    return chosen


def replay(
    label: str, overrides: list[str], registry: Path, events: Path, log: Path, args: Any
) -> dict[str, Any]:
    """One learner over the stream from a fresh copy of the base registry and event log."""
    online = WORK / f"registry-{label}"
    shutil.rmtree(online, ignore_errors=True)
    shutil.copytree(registry, online)
    log_copy = WORK / f"events-{label}.sqlite"
    shutil.copy(events, log_copy)
    run_dir = WORK / f"online-{label}"
    shutil.rmtree(run_dir, ignore_errors=True)
    limit = ["--max-events", str(args.max_events)] if args.max_events else []
    processes = PROCESSES.get(label)
    launcher, threads = RECLOOP, args.threads
    if processes is not None:  # under torchrun, the threads shared by its processes
        launcher = [sys.executable, "-m", "torch.distributed.run",
                    f"--nproc_per_node={processes}", "-m", "recloop.cli"]  # fmt: skip
        threads = max(1, args.threads // processes)
    learner_started = time.perf_counter()
    run([*launcher, "online", "--registry", str(online), "--event-log", str(log_copy),
         "--run-dir", str(run_dir), "--threads", str(threads), *limit, *overrides],
        log)  # fmt: skip
    process_seconds = time.perf_counter() - learner_started

    from recloop.registry import Registry

    reg = Registry(online)
    newest = reg.list()[-1]
    manifest = reg.manifest(newest.id).to_json()
    timings = json.loads((run_dir / "timings.json").read_text())
    prequential = manifest["metrics"]
    published = len(reg.list()) - 1
    shutil.rmtree(online)  # a few hundred MB of versions per setting
    log_copy.unlink()
    return {
        "overrides": overrides,
        "processes": processes or 1,
        "summary": {
            "events": timings["events"],
            "events_per_second": timings["events_per_second"],
            "events_per_second_with_startup": round(timings["events"] / process_seconds, 1),
            "online_HR@10": prequential.get("online/online_HR@10"),
            "frozen_HR@10": prequential.get("online/frozen_HR@10"),
        },
        "learner_seconds": timings["seconds"],
        "process_seconds": round(process_seconds, 1),
        "timings": timings,
        "prequential": prequential,
        "versions_published": published,
        "state": {k: v for k, v in manifest["training"]["online"].items() if k != "admitted"},
        "new_items_admitted": len(manifest["training"]["online"]["admitted"]),
        "config": manifest["training"]["config"],
    }


def table(path: Path) -> str:
    """The result file as a markdown table (the README's figures are copied from this)."""
    data = json.loads(path.read_text())
    lines = [
        f"From `{path.relative_to(REPO)}` (commit {data['commit'][:12]}, {data['date']}; "
        f"learner --threads {data['config']['learner_threads']}, "
        f"{data['config']['max_events'] or 'all'} events).",
        "",
        "| setting | events | events/s (loop) | events/s (with start-up) | HR@10 online "
        "| HR@10 frozen | rate vs before-20 | HR@10 vs before-20 | train | score "
        "| score frozen | publish |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    settings = data["results"]["settings"]
    before = settings.get("before-20", {}).get("summary")
    for label, row in settings.items():
        summary, phases = row["summary"], row["timings"]["phases"]
        share = {k: f"{phases[k]['share']:.0%}" if k in phases else "" for k in
                 ("train", "score", "score_frozen", "publish")}  # fmt: skip
        frozen = summary["frozen_HR@10"]
        rate = hr = ""
        if before:
            rate = f"{summary['events_per_second'] / before['events_per_second']:.1f}x"
            hr = f"{summary['online_HR@10'] / before['online_HR@10'] - 1:+.1%}"
        lines.append(
            f"| {label} | {summary['events']:,} | {summary['events_per_second']:,.0f} "
            f"| {summary['events_per_second_with_startup']:,.0f} | {summary['online_HR@10']:.4f} "
            f"| {'' if frozen is None else f'{frozen:.4f}'} | {rate} | {hr} | {share['train']} "
            f"| {share['score']} | {share['score_frozen']} | {share['publish']} |"
        )
    return "\n".join(lines)


def plot_settings(rows: dict[str, Any], path: Path) -> None:
    """Prequential HR@10 against events/s, one point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, row in rows.items():
        rate, hr = row["summary"]["events_per_second"], row["summary"]["online_HR@10"]
        ax.scatter([rate], [hr], s=40)
        ax.annotate(label, (rate, hr), textcoords="offset points", xytext=(5, 5), fontsize=8)
    frozen = [r["summary"]["frozen_HR@10"] for r in rows.values() if r["summary"]["frozen_HR@10"]]
    if frozen:
        ax.axhline(frozen[0], color="tab:gray", linestyle="--", label="frozen starting model")
        ax.legend()
    ax.set_xscale("log")
    ax.set_xlabel("learner events/s (one process, log scale)")
    ax.set_ylabel("prequential HR@10 (online model)")
    ax.set_title("Online learner settings on the Beauty replay (bench/online_replay.py)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
