"""Serving throughput and latency, as in ../shared/BENCHMARKS.md section 3.

`wrk` (Debian) drives `recloop serve` on 127.0.0.1 with fixed connections, at least 3 runs of
10 s per configuration, for two catalogues:

- beauty: Amazon Beauty (12,101 items), a SASRec trained for a few minutes, exact top-K;
- synthetic-1m: the synthetic generator with 1,000,000 items, a SASRec trained briefly with
  sampled softmax, ANN top-K (faiss IVF, nprobe tuned at load to recall@10 >= 0.95 vs exact);

each with micro-batching on/off and the result cache on/off, plus the same server's trivial
`/healthz` as the ceiling of the HTTP stack. Requests ask for a random known user's top 10
(GET /v1/users/{id}/recommendations?k=10), users drawn uniformly, so the cache hit ratio is what
a uniform user mix gives. Cache hits and misses come from the server's /metrics.

On beauty the same run also measures the naive server (bench/naive_server.py: FastAPI +
torch eager, one request at a time, exact top-k) under the same wrk settings, and writes
recloop's computed answers ("batching, no cache") over its rate as ``recloop_over_naive``.

Writes bench/results/serve.json and serve.png.

    .venv/bin/python bench/serve.py                      # both catalogues
    .venv/bin/python bench/serve.py --only beauty --runs 3 --duration 10 --name serve-beauty
"""

from __future__ import annotations

import argparse
import json
import os
import re
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

from bench.common import REPO, RESULTS, SHARED_DATA, write_result

RECLOOP = [sys.executable, "-m", "recloop.cli"]
WORK = REPO / "runs" / "bench-serve"
API_KEY = "bench-key"
SYNTHETIC_CONFIG = Path(__file__).resolve().parent / "serve-synthetic-1m.toml"
NAIVE_SERVER = Path(__file__).resolve().parent / "naive_server.py"
COMPUTED = "batching, no cache"  # recloop's computed answers, the row compared with naive

# The done() hook prints one JSON line with what wrk's summary does not: p99.9 and status errors.
WRK_SCRIPT = r"""
local users = {USERS}
math.randomseed(12345)
request = function()
  local user = users[math.random(#users)]
  return wrk.format("GET", "/v1/users/" .. user .. "/recommendations?k=10")
end
done = function(summary, latency, requests)
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,' ..
    '"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.mean, latency.max))
end
"""
HEALTH_SCRIPT = WRK_SCRIPT.replace(
    'wrk.format("GET", "/v1/users/" .. user .. "/recommendations?k=10")',
    'wrk.format("GET", "/healthz")',
)


def run(command: list[str], log: Path) -> str:
    with open(log, "a") as f:
        f.write("$ " + " ".join(command) + "\n")
        f.flush()
        done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=f, text=True)
        f.write(done.stdout)
    if done.returncode != 0:
        raise SystemExit(f"command failed ({done.returncode}), see {log}: {' '.join(command)}")
    return done.stdout


# ----------------------------------------------------------------------------- models


def beauty_model(log: Path, retrain: bool) -> tuple[Path, Path]:
    source = SHARED_DATA / "amazon-beauty-iclrec/Beauty.txt"
    if not source.is_file():
        raise SystemExit(f"{source} is absent: the beauty catalogue needs it")
    work = WORK / "beauty"
    data, registry = work / "data", work / "registry"
    if retrain:
        shutil.rmtree(work, ignore_errors=True)
    if not (registry / "versions").is_dir():
        run([*RECLOOP, "prepare", "--format", "s3rec", "--input", str(source), "--out", str(data),
             "--overwrite"], log)  # fmt: skip
        run([*RECLOOP, "train", "--config", str(REPO / "configs/beauty/sasrec.toml"),
             "--data", str(data), "--registry", str(registry), "--run-dir", str(work / "run"),
             "--max-minutes", "4"], log)  # fmt: skip
    return data, registry


def synthetic_model(log: Path, retrain: bool) -> tuple[Path, Path]:
    work = WORK / "synthetic-1m"
    data, registry = work / "data", work / "registry"
    if retrain:
        shutil.rmtree(work, ignore_errors=True)
    if not (registry / "versions").is_dir():
        run([*RECLOOP, "prepare", "--format", "synthetic", "--input", str(SYNTHETIC_CONFIG),
             "--out", str(data), "--overwrite"], log)  # fmt: skip
        # Large batches amortise the per-step cost of the 1M-row table (its AdamW update and
        # the sampled-softmax gathers): 25 minutes give ~3 epochs and item vectors with the
        # catalogue's topic structure, which is what an ANN index relies on.
        run([*RECLOOP, "train", "--data", str(data), "--registry", str(registry),
             "--run-dir", str(work / "run"), "--max-minutes", "25",
             "model.type=sasrec", "model.dim=64", "model.num_blocks=2", "model.num_heads=1",
             "model.dropout=0.1", "model.normalize_embeddings=true", "model.temperature=0.05",
             "train.loss=sampled_softmax", "train.num_negatives=1024", "train.batch_size=2048",
             "train.max_length=50", "train.lr=3e-3", "train.max_epochs=10",
             "train.eval_every_steps=100000", "train.eval_max_users=2000"], log)  # fmt: skip
    return data, registry


def known_users(data: Path, count: int = 20_000) -> list[str]:
    import polars as pl

    users = pl.read_parquet(data / "users.parquet")["raw"].cast(pl.String).to_list()
    rng = np.random.default_rng(0)
    picked = rng.choice(len(users), size=min(count, len(users)), replace=False)
    return [users[i] for i in sorted(picked.tolist())]


# ----------------------------------------------------------------------------- server


class Server:
    def __init__(
        self,
        registry: Path,
        port: int,
        flags: list[str],
        log: Path,
        naive: bool = False,
        threads: int | None = 1,  # None: recloop serve's automatic choice
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.naive = naive
        if naive:
            command = [sys.executable, str(NAIVE_SERVER), "--registry", str(registry),
                       "--port", str(port), "--threads", "1"]  # fmt: skip
        else:
            command = [*RECLOOP, "serve", "--registry", str(registry), "--port", str(port),
                       "--cache-dir", str(WORK / "onnx-cache"), *flags]  # fmt: skip
            if threads is not None:
                command += ["--threads", str(threads)]
        self.log = open(log, "a")  # noqa: SIM115 (closed in stop)
        self.log.write("$ " + " ".join(command) + "\n")
        self.log.flush()
        env = {**os.environ, "RECLOOP_API_KEY": API_KEY}
        self.process = subprocess.Popen(
            command, cwd=REPO, stdout=self.log, stderr=self.log, env=env
        )
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"{command[1]} exited ({self.process.returncode}), see {log}")
            try:
                ready = "/healthz" if naive else "/readyz"
                if httpx.get(f"{self.url}{ready}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"recloop serve did not become ready, see {log}")
            time.sleep(0.5)

    def counters(self) -> dict[str, float]:
        if self.naive:  # no /metrics: nothing is cached or batched there
            return {"recloop_cache_hits_total": 0.0, "recloop_cache_misses_total": 0.0,
                    "batch_sum": 0.0, "batch_count": 0.0}  # fmt: skip
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        found = {}
        for name in ("recloop_cache_hits_total", "recloop_cache_misses_total"):
            match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
            found[name] = float(match.group(1)) if match else 0.0
        sums = re.findall(r"^recloop_batch_size_sum (\S+)$", text, re.MULTILINE)
        counts = re.findall(r"^recloop_batch_size_count (\S+)$", text, re.MULTILINE)
        found["batch_sum"] = float(sums[0]) if sums else 0.0
        found["batch_count"] = float(counts[0]) if counts else 0.0
        return found

    def model(self) -> dict[str, Any]:
        info: dict[str, Any] = httpx.get(f"{self.url}/v1/model", timeout=10).json()
        return info

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def wrk(url: str, script: str, connections: int, duration: int) -> dict[str, Any]:
    path = WORK / "wrk.lua"
    path.write_text(script)
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--timeout",
            "5s",
            "-s",
            str(path),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("WRK_JSON "))
    raw = json.loads(line.removeprefix("WRK_JSON "))
    errors = sum(raw[k] for k in ("connect", "read", "write", "status", "timeout"))
    return {
        "requests_per_s": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "p999_ms": raw["p999_us"] / 1000,
        "mean_ms": round(raw["mean_us"] / 1000, 3),
        "max_ms": raw["max_us"] / 1000,
        "requests": raw["requests"],
        "errors": errors,
        "error_detail": {k: raw[k] for k in ("connect", "read", "write", "status", "timeout")},
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median requests/s (its latencies belong together)."""
    ordered = sorted(runs, key=lambda r: r["requests_per_s"])
    return ordered[len(ordered) // 2]


# ----------------------------------------------------------------------------- benchmark

# target_rate: the goal (recommendations/s at which p99 must stay under target_p99_ms).
CATALOGUES = {
    "beauty": {
        "model": beauty_model,
        "flags": ["--index", "exact"],
        "target_rate": 2000,
        "target_p99_ms": 25,
    },
    "synthetic-1m": {
        "model": synthetic_model,
        "flags": ["--index", "ivf", "--min-recall", "0.95"],
        "target_rate": 1000,
        "target_p99_ms": 50,
    },
}
AT_TARGET = ("batching+cache", "batching, no cache")  # also measured at the target rate
VARIANTS = {
    "batching+cache": [],
    "batching, no cache": ["--no-cache"],
    "no batching, cache": ["--max-batch", "1", "--max-wait-us", "0"],
    "no batching, no cache": ["--max-batch", "1", "--max-wait-us", "0", "--no-cache"],
}


def bench_catalogue(name: str, args: argparse.Namespace, log: Path, port: int) -> dict[str, Any]:
    spec = CATALOGUES[name]
    data, registry = spec["model"](log, args.retrain)  # type: ignore[operator]
    users = known_users(data)
    script = WRK_SCRIPT.replace("{USERS}", "{" + ",".join(json.dumps(u) for u in users) + "}")
    out: dict[str, Any] = {"users_in_mix": len(users), "variants": {}}
    for variant, flags in VARIANTS.items():
        if args.variants and variant not in args.variants:
            continue
        print(f"[{name}] {variant}", flush=True)
        server = Server(registry, port, [*spec["flags"], *flags], log)  # type: ignore[misc]
        try:
            out["model"] = server.model()
            if variant == "batching+cache":  # the HTTP ceiling, same server, same run
                wrk(server.url, HEALTH_SCRIPT, args.connections, 2)  # warm-up
                runs = [
                    wrk(server.url, HEALTH_SCRIPT, args.connections, args.duration)
                    for _ in range(args.runs)
                ]
                out["healthz"] = {"median": median_run(runs), "runs": runs}
            wrk(server.url, script, args.connections, 2)  # warm-up (also fills part of the cache)
            runs = [measured(server, script, args) for _ in range(args.runs)]
            median = median_run(runs)
            ceiling = out.get("healthz", {}).get("median", {}).get("requests_per_s")
            if ceiling:
                median["fraction_of_healthz"] = round(median["requests_per_s"] / ceiling, 3)
            out["variants"][variant] = {"median": median, "runs": runs, "flags": flags}
            if variant in AT_TARGET:
                out["variants"][variant]["at_target"] = at_target_rate(server, script, spec, args)
            print(
                f"  {median['requests_per_s']:.0f} req/s  p50 {median['p50_ms']:.2f} ms  "
                f"p99 {median['p99_ms']:.2f} ms  p99.9 {median['p999_ms']:.2f} ms  "
                f"errors {median['errors']}  hit ratio {median['cache_hit_ratio']}",
                flush=True,
            )
        finally:
            server.stop()
    if name == "beauty" and args.naive:
        out["naive"] = bench_naive(registry, script, args, log, port)
        computed = out["variants"].get(COMPUTED, {}).get("median", {}).get("requests_per_s")
        if computed:
            out["recloop_over_naive"] = round(
                computed / out["naive"]["median"]["requests_per_s"], 2
            )
            print(f"  recloop ({COMPUTED}) / naive: {out['recloop_over_naive']}x", flush=True)
    return out


def bench_naive(
    registry: Path, script: str, args: argparse.Namespace, log: Path, port: int
) -> dict[str, Any]:
    """bench/naive_server.py under the same wrk settings (same users, connections, runs)."""
    print("[beauty] naive (FastAPI + torch eager, one request at a time)", flush=True)
    server = Server(registry, port, [], log, naive=True)
    try:
        wrk(server.url, script, args.connections, 2)  # warm-up
        runs = [wrk(server.url, script, args.connections, args.duration) for _ in range(args.runs)]
    finally:
        server.stop()
    median = median_run(runs)
    print(
        f"  {median['requests_per_s']:.0f} req/s  p50 {median['p50_ms']:.2f} ms  "
        f"p99 {median['p99_ms']:.2f} ms  errors {median['errors']}",
        flush=True,
    )
    return {"median": median, "runs": runs, "server": "bench/naive_server.py, torch 1 thread"}


def measured(
    server: Server, script: str, args: argparse.Namespace, delay_ms: float | None = None
) -> dict[str, Any]:
    """One wrk run plus the server's cache hit ratio and mean batch size over it."""
    if delay_ms is not None:
        script += f"\ndelay = function() return {delay_ms:.3f} end\n"
    before = server.counters()
    result = wrk(server.url, script, args.connections, args.duration)
    after = server.counters()
    hits = after["recloop_cache_hits_total"] - before["recloop_cache_hits_total"]
    misses = after["recloop_cache_misses_total"] - before["recloop_cache_misses_total"]
    batches = after["batch_count"] - before["batch_count"]
    result["cache_hit_ratio"] = round(hits / (hits + misses), 4) if hits + misses else None
    result["mean_batch_size"] = (
        round((after["batch_sum"] - before["batch_sum"]) / batches, 2) if batches else None
    )
    return result


def at_target_rate(
    server: Server, script: str, spec: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Latency at the issue's target rate rather than at saturation: each connection waits
    (wrk's delay() hook) so that the connections together offer about target_rate requests/s.
    wrk stays closed-loop per connection, so the delay is calibrated once from a short run:
    per connection, 1000 / rate = delay + latency."""
    rate, connections = spec["target_rate"], args.connections
    offered = rate * 1.03  # aim a little above: the goal is "at least" the target rate
    delay = connections * 1000.0 / offered
    probe = dict(vars(args))
    probe["duration"] = 3
    first = measured(server, script, argparse.Namespace(**probe), delay)
    latency = connections * 1000.0 / max(first["requests_per_s"], 1.0) - delay
    delay = max(0.0, connections * 1000.0 / offered - latency)
    runs = [measured(server, script, args, delay) for _ in range(args.runs)]
    median = median_run(runs)
    print(
        f"  at {rate}/s offered: {median['requests_per_s']:.0f} req/s  p50 {median['p50_ms']:.2f}"
        f" ms  p99 {median['p99_ms']:.2f} ms (target {spec['target_p99_ms']} ms)  errors "
        f"{median['errors']}",
        flush=True,
    )
    return {
        "target_rate": rate,
        "target_p99_ms": spec["target_p99_ms"],
        "delay_ms_per_request": round(delay, 3),
        "median": median,
        "runs": runs,
        "met": median["requests_per_s"] >= rate
        and median["p99_ms"] < spec["target_p99_ms"]
        and median["errors"] == 0,
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels, rps, p99 = [], [], []
    for catalogue, out in results.items():
        for variant, value in out["variants"].items():
            labels.append(f"{catalogue}\n{variant}")
            rps.append(value["median"]["requests_per_s"])
            p99.append(value["median"]["p99_ms"])
    x = np.arange(len(labels))
    axes[0].bar(x, rps, color="tab:blue")
    axes[0].set_ylabel("recommendations/s (median of runs)")
    axes[1].bar(x, p99, color="tab:orange")
    axes[1].set_ylabel("p99 latency (ms)")
    for ax in axes:
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("recloop serve under wrk on 127.0.0.1 (bench/results/serve.json)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(path: Path) -> str:
    """Markdown table of a serve.json (what the README shows), medians of the runs."""
    data = json.loads(path.read_text())
    lines = [
        f"From `{path.relative_to(REPO)}` (commit {data['commit'][:12]}, {data['date']}; "
        f"wrk {data['config']['connections']} connections, {data['config']['runs']} runs of "
        f"{data['config']['duration_s']} s, median run shown).",
        "",
        "| catalogue | index | variant | req/s | p50 ms | p99 ms | p99.9 ms | errors "
        "| cache hits | of /healthz |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for catalogue, out in data["results"].items():
        model = out.get("model", {})
        index = f"{model.get('index')} ({model.get('num_items', 0):,} items)"
        health = out.get("healthz", {}).get("median")
        if health:
            lines.append(
                f"| {catalogue} | | /healthz (ceiling) | {health['requests_per_s']:,.0f} "
                f"| {health['p50_ms']:.2f} | {health['p99_ms']:.2f} | {health['p999_ms']:.2f} "
                f"| {health['errors']} | | |"
            )
        naive = out.get("naive", {}).get("median")
        if naive:
            lines.append(
                f"| {catalogue} | exact (torch topk) | naive FastAPI + torch, one at a time "
                f"| {naive['requests_per_s']:,.0f} | {naive['p50_ms']:.2f} | {naive['p99_ms']:.2f} "
                f"| {naive['p999_ms']:.2f} | {naive['errors']} | | |"
            )
        for variant, value in out["variants"].items():
            rows = [(variant + " (saturation)", value["median"])]
            if "at_target" in value:
                target = value["at_target"]
                label = (
                    f"{variant} at {target['target_rate']:,}/s offered "
                    f"(p99 target {target['target_p99_ms']} ms: "
                    f"{'met' if target['met'] else 'missed'})"
                )
                rows.append((label, target["median"]))
            for label, m in rows:
                hits = "" if m.get("cache_hit_ratio") is None else f"{m['cache_hit_ratio']:.2f}"
                lines.append(
                    f"| {catalogue} | {index} | {label} | {m['requests_per_s']:,.0f} "
                    f"| {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['p999_ms']:.2f} "
                    f"| {m['errors']} | {hits} | {m.get('fraction_of_healthz', '')} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the table of NAME.json")
    parser.add_argument("--only", nargs="*", choices=sorted(CATALOGUES), default=sorted(CATALOGUES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument(
        "--variants", nargs="*", choices=sorted(VARIANTS), default=None, help="default: all"
    )
    parser.add_argument(
        "--naive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="beauty: also measure bench/naive_server.py (default on)",
    )
    parser.add_argument("--retrain", action="store_true", help="rebuild the models from scratch")
    parser.add_argument(
        "--name",
        default="serve",
        help="result name: writes bench/results/NAME.json, .png and .log (a partial re-run, e.g. "
        "--only beauty, gets its own name so that serve.json keeps every catalogue)",
    )
    args = parser.parse_args()
    if args.table:
        print(table(RESULTS / f"{args.name}.json"))
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run `make system-deps`")
    started = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / f"{args.name}.log"
    log.unlink(missing_ok=True)
    results = {name: bench_catalogue(name, args, log, args.port) for name in args.only}
    config = {
        "runs": args.runs,
        "duration_s": args.duration,
        "connections": args.connections,
        "wrk_threads": 1,
        "request": "GET /v1/users/{random known user}/recommendations?k=10",
        "server": "recloop serve (1 process, uvloop + httptools, ONNX Runtime 1 thread)",
    }
    path = write_result(args.name, config, results, started)
    plot(results, RESULTS / f"{args.name}.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
