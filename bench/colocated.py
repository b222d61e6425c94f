"""Serve and learn on one machine: `recloop serve` and `recloop online` together vs each alone.

The embedded deployment runs both on one box. Each picks its intra-op threads from the cores it
is given and the other recloop processes running (recloop.threads); this measures what that
gives, on the data of bench/online_replay.py (its work dir: the base model's registry, the
dataset and stream.jsonl; run `bench/online_replay.py --base-only` first):

1. serve alone: `recloop serve` on (a copy of) the base registry, computed answers with no
   result cache (bench/serve.py's "batching, no cache" variant), driven by wrk over known users:
   req/s and p99;
2. learner alone: `recloop online` (its default settings, or the online.key=value given) over a
   fresh `recloop ingest` of stream.jsonl into a fresh copy of the registry (as online_replay.py
   does): events/s, from its RUN/timings.json (the figure online_replay.py reports);
3. both: the server started first (as a server runs before a learner joins it), then the
   learner, with wrk runs of --duration back to back for as long as the learner runs: req/s
   (the median run) and events/s together.

Every process runs with its default (automatic) threads; the result records what each chose,
from its start line (`recloop serve: threads: N (...)`).

    .venv/bin/python bench/colocated.py                          # the whole replay
    .venv/bin/python bench/colocated.py --duration 2 --max-events 512   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.serve as serve_bench
from bench.common import REPO, RESULTS, write_result
from bench.serve import WRK_SCRIPT, Server, known_users, median_run, run, wrk

RECLOOP = [sys.executable, "-m", "recloop.cli"]
REPLAY = REPO / "runs" / "bench-online-replay"
NO_CACHE = ["--index", "exact", "--no-cache"]  # bench/serve.py's "batching, no cache" on Beauty
THREADS_LINE = re.compile(r"recloop (serve|online): (threads: (\d+) \(.*\))$", re.MULTILINE)


def chosen_threads(text: str, command: str) -> dict[str, Any] | None:
    """The last start line of `recloop <command>` in ``text``: its threads and the whole line."""
    found = [m for m in THREADS_LINE.finditer(text) if m.group(1) == command]
    if not found:
        return None
    return {"threads": int(found[-1].group(3)), "line": found[-1].group(2)}


class Learner:
    """`recloop online` over a fresh copy of the registry and a fresh ingest of the stream."""

    def __init__(self, replay: Path, scratch: Path, args: argparse.Namespace, log: Path) -> None:
        self.registry, self.events = scratch / "online-registry", scratch / "events.sqlite"
        registry = self.registry
        shutil.rmtree(registry, ignore_errors=True)
        shutil.copytree(replay / "registry", registry)
        for path in (self.events, *scratch.glob("events.sqlite-*")):
            path.unlink(missing_ok=True)
        self.run_dir = run_dir = scratch / "online"
        shutil.rmtree(run_dir, ignore_errors=True)
        run([*RECLOOP, "ingest", str(replay / "stream.jsonl"), "--event-log", str(self.events)],
            log)  # fmt: skip
        limit = ["--max-events", str(args.max_events)] if args.max_events is not None else []
        command = [*RECLOOP, "online", "--registry", str(registry), "--event-log",
                   str(self.events), "--run-dir", str(run_dir), *limit,
                   *args.overrides]  # fmt: skip
        self.log = log
        with open(log, "a") as f:
            f.write("$ " + " ".join(command) + "\n")
        # Files, not pipes: nobody reads a pipe while wrk runs, and a full one would stall it.
        self.stdout, self.stderr = scratch / "online.out", scratch / "online.err"
        self.started = time.perf_counter()
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err)

    def finish(self) -> dict[str, Any]:
        self.process.wait()
        wall = time.perf_counter() - self.started
        out, err = self.stdout.read_text(), self.stderr.read_text()
        with open(self.log, "a") as f:
            f.write(err + out)
        if self.process.returncode != 0:
            raise SystemExit(f"recloop online failed ({self.process.returncode}), see {self.log}")
        timings = json.loads((self.run_dir / "timings.json").read_text())
        shutil.rmtree(self.registry)  # hundreds of MB of versions after a whole replay
        return {
            "events": timings["events"],
            "seconds": timings["seconds"],
            "events_per_s": timings["events_per_second"],
            "process_wall_seconds": round(wall, 1),
            "threads": chosen_threads(err, "online"),
        }


def start_server(registry: Path, port: int, log: Path) -> tuple[Server, dict[str, Any] | None]:
    offset = log.stat().st_size if log.exists() else 0
    server = Server(registry, port, NO_CACHE, log, threads=None)  # automatic, as a user runs it
    with open(log) as f:
        f.seek(offset)
        return server, chosen_threads(f.read(), "serve")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--runs", type=int, default=3, help="wrk runs of the server alone")
    parser.add_argument("--max-events", type=int, default=None, help="learner: stop after N")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--port", type=int, default=18090)
    parser.add_argument("--replay", type=Path, default=REPLAY, help="online_replay.py's work dir")
    parser.add_argument("--name", default="colocated", help="writes bench/results/NAME.json")
    parser.add_argument("overrides", nargs="*", help="online.key=value for the learner")
    args = parser.parse_args()
    if args.duration < 1 or args.runs < 1 or (args.max_events is not None and args.max_events < 1):
        parser.error("--duration, --runs and --max-events must be >= 1")
    replay: Path = args.replay
    if not (replay / "registry" / "versions").is_dir() or not (replay / "stream.jsonl").is_file():
        raise SystemExit(
            f"{replay}: no base model or stream; run bench/online_replay.py --base-only"
        )
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run `make system-deps`")
    started = time.perf_counter()
    scratch = REPO / "runs" / "bench-colocated"
    scratch.mkdir(parents=True, exist_ok=True)
    serve_bench.WORK.mkdir(parents=True, exist_ok=True)  # wrk.lua and the ONNX cache live there
    log = RESULTS / f"{args.name}.log"
    log.unlink(missing_ok=True)
    registry = scratch / "serve-registry"  # the server reads a copy: nothing touches the base
    shutil.rmtree(registry, ignore_errors=True)
    shutil.copytree(replay / "registry", registry)
    users = known_users(replay / "data")
    script = WRK_SCRIPT.replace("{USERS}", "{" + ",".join(json.dumps(u) for u in users) + "}")

    print("serve alone", flush=True)
    server, serve_threads = start_server(registry, args.port, log)
    try:
        wrk(server.url, script, args.connections, 2)  # warm-up
        runs = [wrk(server.url, script, args.connections, args.duration) for _ in range(args.runs)]
    finally:
        server.stop()
    serve_alone = {"median": median_run(runs), "runs": runs, "threads": serve_threads}

    print("learner alone", flush=True)
    learner_alone = Learner(replay, scratch, args, log).finish()

    print("serve + learner", flush=True)
    server, serve_threads = start_server(registry, args.port, log)
    try:
        wrk(server.url, script, args.connections, 2)  # warm-up, before the learner starts
        learner = Learner(replay, scratch, args, log)
        together_runs = [wrk(server.url, script, args.connections, args.duration)]
        while learner.process.poll() is None:  # load the server for as long as the learner runs
            together_runs.append(wrk(server.url, script, args.connections, args.duration))
        learner_together = learner.finish()
    finally:
        server.stop()
    together = {
        "serve": {
            "median": median_run(together_runs),
            "runs": together_runs,
            "threads": serve_threads,
        },
        "learner": learner_together,
    }
    results = {
        "serve_alone": serve_alone,
        "learner_alone": learner_alone,
        "together": together,
        "together_vs_alone": {
            "requests_per_s": round(
                together["serve"]["median"]["requests_per_s"]
                / serve_alone["median"]["requests_per_s"],
                3,
            ),
            "events_per_s": round(
                learner_together["events_per_s"] / learner_alone["events_per_s"], 3
            ),
        },
    }
    config = {
        "replay": str(replay.relative_to(REPO) if replay.is_relative_to(REPO) else replay),
        "serve_flags": NO_CACHE,
        "order": "serve started first, then the learner (each with automatic threads)",
        "duration_s": args.duration,
        "serve_alone_runs": args.runs,
        "connections": args.connections,
        "wrk_threads": 1,
        "max_events": args.max_events,
        "learner_overrides": args.overrides,
        "request": "GET /v1/users/{random known user}/recommendations?k=10",
    }
    path = write_result(args.name, config, results, started)
    for label, row in (("alone", serve_alone), ("together", together["serve"])):
        median = row["median"]
        print(f"serve {label}: {median['requests_per_s']:.0f} req/s, p99 {median['p99_ms']:.1f} ms")
    for label, learned in (("alone", learner_alone), ("together", learner_together)):
        print(f"learner {label}: {learned['events_per_s']:.0f} events/s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
