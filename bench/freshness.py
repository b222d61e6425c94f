"""Freshness of the online loop, as in ../shared/BENCHMARKS.md section 4.

Three measurements, each p50/p99 over repeated trials:

- event_to_recommendation: `recloop serve` (Beauty SASRec, in-process state, durable SQLite
  event log) on 127.0.0.1. For a random known user, POST /v1/events with one interaction, then,
  from the moment the POST returns, GET the user's recommendations until the answer reflects
  the event: not served from the cache, and the item just interacted with is excluded as seen.
- new_item: the same service following the registry (--follow 0.2) and `recloop online --follow`
  consuming the same event log (admit_after=2, publish every second). A never-seen item id gets
  its first two interactions through POST /v1/events; the clock runs until
  GET /v1/items/{id}/similar answers 200, i.e. the served model version has the item in its
  vocabulary and index.
- delta: publish-and-apply of N changed item rows: the learner's own publish (changed rows
  diffed, learner state saved, delta written and fsynced, offset committed) and then the
  service runtime's ModelHolder.load of that version (what --follow runs). N = 1,000 on Beauty
  (12,101 items, trained SASRec) and N = 1,000 and 100,000 on a 1,000,000-item SASRec (d=64,
  random weights: timing only, nothing here depends on the values).

Writes bench/results/freshness.json and freshness.png.

    .venv/bin/python bench/freshness.py
    .venv/bin/python bench/freshness.py --only delta --trials 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, write_result
from bench.serve import API_KEY, RECLOOP, WORK, Server, beauty_model, known_users

FRESH = WORK.parent / "bench-freshness"
HEADERS = {"X-API-Key": API_KEY}


def percentiles(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {
        "n": len(values),
        "p50": round(float(np.percentile(array, 50)), 4),
        "p99": round(float(np.percentile(array, 99)), 4),
        "max": round(float(array.max()), 4),
    }


def fresh_registry(source: Path, name: str) -> Path:
    target = FRESH / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target / "registry")
    return target


# ----------------------------------------------------------------------------- event -> rec


def event_to_recommendation(data: Path, registry: Path, trials: int, log: Path) -> dict[str, Any]:
    work = fresh_registry(registry, "event")
    server = Server(work / "registry", 18090, ["--event-log", str(work / "events.sqlite")], log)
    users = known_users(data, trials)
    rng = np.random.default_rng(0)
    items = [str(i) for i in rng.integers(1, 12_000, size=trials)]
    waits_ms, polls = [], []
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for user, item in zip(users, items, strict=True):
                path = f"/v1/users/{user}/recommendations"
                http.get(path, params={"k": 10}).raise_for_status()  # warm: now cached
                event = {"events": [{"user_id": user, "item_id": item}]}
                http.post("/v1/events", json=event, headers=HEADERS).raise_for_status()
                posted = time.perf_counter()
                gets = 0
                while gets < 1000:
                    gets += 1
                    body = http.get(path, params={"k": 10}).json()
                    ids = {entry["item_id"] for entry in body["items"]}
                    if not body["cached"] and item not in ids:
                        break
                waits_ms.append((time.perf_counter() - posted) * 1000)
                polls.append(gets)
    finally:
        server.stop()
    return {"ms": percentiles(waits_ms), "gets_needed": percentiles(polls)}


# ----------------------------------------------------------------------------- new item


def new_item(registry: Path, trials: int, log: Path) -> dict[str, Any]:
    work = fresh_registry(registry, "new-item")
    events = work / "events.sqlite"
    server = Server(work / "registry", 18091, ["--event-log", str(events), "--follow", "0.2"], log)
    with open(log, "a") as out:
        learner = subprocess.Popen(
            [*RECLOOP, "online", "--registry", str(work / "registry"), "--event-log", str(events),
             "--run-dir", str(work / "online"), "--follow", "online.admit_after=2",
             "online.publish_every_seconds=1", "online.poll_seconds=0.05",
             "online.replay_windows=64"],
            stdout=out, stderr=out, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    seconds: list[float] = []
    try:
        time.sleep(15)  # the learner's start-up (torch import, model, log replay)
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for trial in range(trials):
                raw = f"bench-new-{trial}"
                batch = [{"user_id": f"fresh-{trial}-{n}", "item_id": raw} for n in range(2)]
                started = time.perf_counter()
                http.post("/v1/events", json={"events": batch}, headers=HEADERS)
                while http.get(f"/v1/items/{raw}/similar", params={"k": 1}).status_code != 200:
                    if time.perf_counter() - started > 120:
                        raise SystemExit(f"{raw} not recommendable after 120 s, see {log}")
                    time.sleep(0.05)
                seconds.append(time.perf_counter() - started)
                print(f"  new item {trial}: {seconds[-1]:.2f} s", flush=True)
            model = http.get("/v1/model").json()
    finally:
        learner.send_signal(signal.SIGINT)
        learner.wait(timeout=120)
        server.stop()
    return {"seconds": percentiles(seconds), "served_last": model}


# ----------------------------------------------------------------------------- delta


def million_item_registry(root: Path, items: int = 1_000_000, dim: int = 64) -> Path:
    """A SASRec with `items` items and random weights, published as a full version."""
    import torch

    from recloop.models.factory import build_model

    registry = root / "registry"
    if (registry / "versions").is_dir():
        return registry
    torch.manual_seed(0)
    model = build_model("sasrec", {"num_items": items, "dim": dim, "num_blocks": 2})
    publish_numbered(model, root, registry)
    return registry


def publish_numbered(model: Any, root: Path, registry: Path) -> None:
    """Publishes ``model`` as a full version whose raw item ids are its dense ids 1..N."""
    import polars as pl

    from recloop.models.factory import config_to_dict
    from recloop.registry import Registry

    items = int(model.item_embedding.num_items)
    vocabulary = root / "items.parquet"
    root.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"id": range(1, items + 1), "raw": range(1, items + 1)}).write_parquet(vocabulary)
    Registry(registry).publish(
        {k: v.detach().contiguous() for k, v in model.state_dict().items()},
        model=config_to_dict(model),
        extra_files={"items.parquet": vocabulary},
        vocabulary_file="items.parquet",
        method="train",
    )


def delta_publish_apply(
    name: str, registry: Path, rows: int, trials: int, engine: str
) -> dict[str, Any]:
    import torch

    from recloop.events import SqliteEventLog
    from recloop.online.config import OnlineConfig
    from recloop.online.learner import OnlineLearner
    from recloop.registry import Registry
    from recloop.serve.bundle import LoadOptions
    from recloop.serve.holder import ModelHolder

    work = fresh_registry(registry, f"delta-{name}-{rows}")
    reg = Registry(work / "registry")
    holder = ModelHolder(reg, LoadOptions(engine=engine, cache_dir=FRESH / "onnx-cache"), "latest")
    holder.load()  # the service's starting version (a full load, not measured)
    with SqliteEventLog(work / "events.sqlite") as events:
        learner = OnlineLearner(
            reg, events, OnlineConfig(publish_every_seconds=0, compact_every=0), work / "online"
        )
        table = learner.model.item_embedding.weight
        generator = torch.Generator().manual_seed(0)
        publish_s, apply_s, details = [], [], {}
        for trial in range(trials):
            picked = torch.randperm(len(table) - 1, generator=generator)[:rows] + 1
            with torch.no_grad():
                table[picked] += 0.01 * torch.randn(rows, table.shape[1], generator=generator)
            started = time.perf_counter()
            version = learner.publish(force=True)
            published = time.perf_counter()
            assert version is not None
            bundle, _ = holder.load(version)
            applied = time.perf_counter()
            publish_s.append(published - started)
            apply_s.append(applied - published)
            details = bundle.describe()
            print(
                f"  {name} {rows:,} rows, trial {trial}: publish {publish_s[-1]:.3f} s, "
                f"apply {apply_s[-1]:.3f} s",
                flush=True,
            )
    total = [p + a for p, a in zip(publish_s, apply_s, strict=True)]
    return {
        "catalogue_items": int(len(table) - 1),
        "rows": rows,
        "engine": engine,
        "publish_s": percentiles(publish_s),
        "apply_s": percentiles(apply_s),
        "total_s": percentiles(total),
        "served": {k: details.get(k) for k in ("version", "applied_delta", "apply_seconds")},
    }


# ----------------------------------------------------------------------------- report


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if "event_to_recommendation" in results:
        r = results["event_to_recommendation"]["ms"]
        panels.append(("event -> recommendation (ms)", ["p50", "p99"], [r["p50"], r["p99"]], 100))
    if "new_item" in results:
        r = results["new_item"]["seconds"]
        panels.append(("new item recommendable (s)", ["p50", "p99"], [r["p50"], r["p99"]], 10))
    if "delta" in results:
        labels = [
            f"{d['catalogue_items'] // 1000}k items\n{d['rows']:,} rows" for d in results["delta"]
        ]
        values = [d["total_s"]["p99"] for d in results["delta"]]
        panels.append(("delta publish + apply, p99 (s)", labels, values, 2))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, labels, values, target) in zip(axes[0], panels, strict=True):
        ax.bar(labels, values, color="tab:blue")
        ax.axhline(target, color="tab:red", linestyle="--", label=f"target {target}")
        ax.set_title(title)
        ax.legend()
        for i, value in enumerate(values):
            ax.text(i, value, f"{value:.3g}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ("event", "new-item", "delta")
    parser.add_argument("--only", nargs="*", choices=parts, default=list(parts))
    parser.add_argument("--trials", type=int, default=0, help="override every part's trials")
    parser.add_argument("--engine", default="onnx", help="serving engine for the delta apply")
    args = parser.parse_args()
    started = time.perf_counter()
    FRESH.mkdir(parents=True, exist_ok=True)
    log = RESULTS / "freshness.log"
    log.unlink(missing_ok=True)
    data, registry = beauty_model(log, retrain=False)
    results: dict[str, Any] = {}
    if "event" in args.only:
        print("event -> recommendation", flush=True)
        results["event_to_recommendation"] = event_to_recommendation(
            data, registry, args.trials or 300, log
        )
        print(f"  {results['event_to_recommendation']['ms']}", flush=True)
    if "new-item" in args.only:
        print("new item", flush=True)
        results["new_item"] = new_item(registry, args.trials or 10, log)
    if "delta" in args.only:
        print("delta publish + apply", flush=True)
        million = million_item_registry(FRESH / "synthetic-1m")
        trials = args.trials or 5
        results["delta"] = [
            delta_publish_apply("beauty", registry, 1_000, trials, args.engine),
            delta_publish_apply("1m", million, 1_000, trials, args.engine),
            delta_publish_apply("1m", million, 100_000, trials, args.engine),
        ]
    config = {
        "server": "recloop serve, 1 process, in-process state, SQLite event log",
        "learner": "recloop online --follow, admit_after=2, publish every 1 s",
        "trials": args.trials or "default",
        "engine": args.engine,
    }
    path = write_result("freshness", config, results, started)
    plot(results, RESULTS / "freshness.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
