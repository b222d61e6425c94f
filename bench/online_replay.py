"""Prequential HR@10 of the online learner vs the frozen model on a replayed Amazon Beauty stream.

Beauty (S3-Rec format) keeps each user's items in time order but no timestamps, so "time" here
is the position within the user's sequence: the first 80% of every user's items (at least 4 of
them) form the training set, and the remaining items are the stream, ordered by their relative
position (j / length) across users, so early-in-history events of all users come first. Items
that never occur in the training part are new items: they join the vocabulary online.

1. `recloop prepare` + `recloop train` (configs/beauty/sasrec.toml, --max-minutes) on the 80%.
2. `recloop ingest` the stream into a SQLite event log.
3. `recloop online` over it (test-then-train: each event scored by both models first).

Writes bench/results/online_replay.json and online_replay.png (the learner's prequential plot).

    .venv/bin/python bench/online_replay.py [--train-minutes 6] [online.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

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
    parser.add_argument("overrides", nargs="*", help="online.key=value for the learner")
    args = parser.parse_args()
    if not SOURCE.is_file():
        raise SystemExit(f"{SOURCE} is absent: this benchmark needs Amazon Beauty")
    started = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    log = RESULTS / "online_replay.log"
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
    # A fresh learner each run: the base version stays, online versions and the log go.
    online = WORK / "online-registry"
    shutil.rmtree(online, ignore_errors=True)
    shutil.copytree(registry, online)
    events = WORK / "events.sqlite"
    for path in (events, *WORK.glob("events.sqlite-*")):
        path.unlink(missing_ok=True)
    run_dir = WORK / "online"
    shutil.rmtree(run_dir, ignore_errors=True)
    run([*RECLOOP, "ingest", str(stream), "--event-log", str(events)], log)
    learner_started = time.perf_counter()
    summary = run([*RECLOOP, "online", "--registry", str(online), "--event-log", str(events),
                   "--run-dir", str(run_dir), "--threads", "2", *args.overrides], log)  # fmt: skip
    learner_seconds = time.perf_counter() - learner_started
    print(summary, flush=True)

    from recloop.registry import Registry

    reg = Registry(online)
    newest = reg.list()[-1]
    manifest = reg.manifest(newest.id).to_json()
    base = reg.manifest("v000001").to_json()
    results = {
        "split": split,
        "base_model": {
            "version": "v000001",
            "test_metrics_on_80pct": {
                k: v for k, v in (base.get("metrics") or {}).items() if k.startswith("test/")
            },
            "training": {k: base["training"].get(k) for k in ("stopped_by", "steps", "epochs")},
        },
        "online": {
            "newest_version": newest.id,
            "versions_published": len(reg.list()) - 1,
            "prequential": manifest["metrics"],
            "state": {k: v for k, v in manifest["training"]["online"].items() if k != "admitted"},
            "new_items_admitted": len(manifest["training"]["online"]["admitted"]),
            "config": manifest["training"]["config"],
            "learner_wall_seconds": round(learner_seconds, 1),
        },
    }
    config = {
        "dataset": "amazon-beauty-iclrec/Beauty.txt",
        "past_fraction": PAST_FRACTION,
        "train_config": "configs/beauty/sasrec.toml",
        "train_minutes": None if args.train_steps is not None else args.train_minutes,
        "train_steps": args.train_steps,
        "overrides": args.overrides,
    }
    path = write_result("online_replay", config, results, started)
    shutil.copy(run_dir / "prequential.png", RESULTS / "online_replay.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
