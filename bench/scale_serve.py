"""Serving past one process: replicas behind nginx, Redis for state, faiss IVF or Milvus.

On this machine, as processes on 127.0.0.1 (bench/cluster.py: redis-server, `recloop serve`
replicas with --redis-url for user state and events, nginx with deploy/nginx/recloop.conf):

- throughput: `wrk` (fixed connections, runs of D seconds, the modes alternated in rounds, the
  median run reported) against one replica directly, nginx in front of that one replica (the
  overhead nginx adds, same run), and nginx in front of two replicas; every answer computed
  (--no-cache) from the user's events read from Redis. For two catalogues:
  * beauty: Amazon Beauty (12,101 items), the SASRec of bench/serve.py;
  * synthetic-1m: 1,000,000 items with a clustered item table (64 dims) and a random encoder
    (timing only: the quality of the vectors does not matter, their geometry does for the ANN
    index), users whose recent events (20 items of one cluster) are written to Redis;
  each with the index in-process (faiss IVF, nprobe tuned at load to recall@10 >= 0.95 vs
  exact) and in Milvus (IVF_FLAT, nprobe tuned to the same target: --index milvus-ivf), recall@10
  as each replica measured it. Milvus is one real Milvus server (standalone, the `milvus`
  package's embedded build: `make bench-deps`) shared by the replicas, each with its own alias,
  as deploy/README.md describes; `--milvus lite` uses milvus-lite per replica instead.
- freshness across replicas (beauty, cache on): an event POSTed to replica A, then GETs to
  replica B until its answer reflects the event (not cached, the item excluded as seen).
- promote: replicas follow `production` (--follow 0.2); `production` moves between two full
  versions; the time until both replicas serve it (a full load), with a client sending
  requests through nginx all along (its failures counted).

Writes bench/results/NAME.json (default scale_serve), NAME.png and NAME.log.

    .venv/bin/python bench/scale_serve.py
    .venv/bin/python bench/scale_serve.py --only beauty --indexes ivf --runs 1 --name scratch
    .venv/bin/python bench/scale_serve.py --table
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cluster import Cluster, Nginx, Replica, Traffic, free_port
from bench.common import REPO, RESULTS, write_result
from bench.freshness import percentiles, publish_numbered
from bench.serve import API_KEY, WORK, WRK_SCRIPT, beauty_model, known_users, median_run, wrk

SCALE = WORK.parent / "bench-scale-serve"
HEADERS = {"X-API-Key": API_KEY}
INDEXES = {
    "ivf": ["--index", "ivf", "--min-recall", "0.95"],
    "milvus-ivf": ["--index", "milvus-ivf", "--min-recall", "0.95"],
    "milvus": ["--index", "milvus"],  # FLAT: exact
}
DEFAULT_INDEXES = ["ivf", "milvus-ivf"]
MODES = ("direct, 1 replica", "nginx, 1 replica", "nginx, 2 replicas")
SYNTHETIC_USERS = 20_000


# ----------------------------------------------------------------------------- catalogues


def beauty(log: Path) -> tuple[Path, list[str], Callable[[str], None]]:
    """The bench/serve.py Beauty model in a registry of our own (we promote in it)."""
    data, source = beauty_model(log, retrain=False)
    registry = SCALE / "beauty" / "registry"
    if not (registry / "versions").is_dir():
        shutil.copytree(source, registry)
    return registry, known_users(data), lambda url: None


def synthetic_1m(log: Path) -> tuple[Path, list[str], Callable[[str], None]]:
    """A 1M-item SASRec with a clustered item table; users' events go to Redis."""
    root = SCALE / "synthetic-1m"
    labels = clustered_million_registry(root)
    users = [f"s{n}" for n in range(SYNTHETIC_USERS)]

    def seed(redis_url: str) -> None:
        import redis

        rng = np.random.default_rng(1)
        members = [np.flatnonzero(labels == c) + 1 for c in range(int(labels.max()) + 1)]
        client = redis.Redis.from_url(redis_url)
        pipe = client.pipeline(transaction=False)
        for n, user in enumerate(users):
            items = rng.choice(members[int(rng.integers(len(members)))], size=20)
            pipe.rpush(f"recloop:seq:{user}", *[str(i) for i in items.tolist()])
            if n % 1000 == 999:
                pipe.execute()
        pipe.execute()
        client.close()

    return root / "registry", users, seed


def clustered_million_registry(root: Path, items: int = 1_000_000, dim: int = 64) -> np.ndarray:
    """The registry (built once) and each item's cluster label."""
    import torch

    from recloop.models.factory import build_model

    rng = np.random.default_rng(0)
    clusters = 1000
    labels = rng.integers(clusters, size=items)
    registry = root / "registry"
    if (registry / "versions").is_dir():
        return labels
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    table = centres[labels] + 0.35 * rng.standard_normal((items, dim)).astype(np.float32)
    table *= rng.lognormal(0.0, 0.25, size=(items, 1)).astype(np.float32)  # popularity-like norms
    torch.manual_seed(0)
    model = build_model(
        "sasrec", {"num_items": items, "dim": dim, "num_blocks": 2, "max_length": 50}
    )
    with torch.no_grad():
        model.item_embedding.weight[1:] = torch.from_numpy(table) * 0.1
    publish_numbered(model, root, registry)
    return labels


CATALOGUES: dict[str, Callable[[Path], tuple[Path, list[str], Callable[[str], None]]]] = {
    "beauty": beauty,
    "synthetic-1m": synthetic_1m,
}


# ----------------------------------------------------------------------------- cluster


@contextmanager
def milvus_server(workdir: Path) -> Iterator[str]:
    """A Milvus standalone server (the `milvus` package) on 127.0.0.1; yields its URI."""
    from milvus import MilvusServer
    from pymilvus import MilvusClient

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    server = MilvusServer()
    server.set_base_dir(str(workdir))
    server.listen_port = free_port()
    server.start()
    uri = f"http://127.0.0.1:{server.listen_port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # its health check can pass a moment before the proxy takes clients
            try:
                MilvusClient(uri=uri).close()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield uri
    finally:
        server.stop()


@contextmanager
def running_cluster(
    name: str, registry: Path, flags: list[str], milvus_uri: str | None = None, replicas: int = 2
) -> Iterator[Cluster]:
    """Redis and ``replicas`` replicas; a Milvus index on ``milvus_uri`` (a shared server)
    when given, an alias per replica, else milvus-lite in each."""
    from recloop.registry import Registry
    from tests.redis_server import running_redis

    reg = Registry(registry, create=False)
    if reg.production() is None:
        reg.promote(reg.resolve("latest"))
    work = SCALE / "work" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with running_redis(work / "redis") as redis:
        cluster = Cluster(
            registry,
            redis.url,
            work,
            API_KEY,
            version="production",
            serve_flags=flags,
            onnx_cache=registry.parent / "onnx-cache",  # one export per catalogue, kept
            ready_timeout=1800,  # 1M items into Milvus: the build is minutes
        )
        if milvus_uri is not None and any(f.startswith("milvus") for f in flags):
            cluster.serve_flags += ["--index-uri", milvus_uri]
            cluster.alias_per_replica = True
        try:
            for n in range(replicas):
                started = time.perf_counter()
                replica = cluster.start_replica("ab"[n])
                print(f"  replica {replica.name} ready in {time.perf_counter() - started:.1f} s")
            yield cluster
        finally:
            cluster.stop()


def nginx_for(cluster: Cluster, replicas: list[Replica], name: str) -> Nginx:
    nginx = Nginx(cluster.workdir / name, free_port(), [r.port for r in replicas])
    nginx.start()
    return nginx


def script_for(users: list[str]) -> str:
    return WRK_SCRIPT.replace("{USERS}", "{" + ",".join(json.dumps(u) for u in users) + "}")


def throughput(
    catalogue: str, index: str, args: argparse.Namespace, log: Path, milvus_uri: str | None
) -> dict[str, Any]:
    registry, users, seed = CATALOGUES[catalogue](log)
    flags = [*INDEXES[index], "--no-cache"]
    print(f"[{catalogue} / {index}]", flush=True)
    with running_cluster(f"{catalogue}-{index}", registry, flags, milvus_uri) as cluster:
        seed(cluster.redis_url)
        a, b = cluster.replicas["a"], cluster.replicas["b"]
        one, two = nginx_for(cluster, [a], "nginx-1"), nginx_for(cluster, [a, b], "nginx-2")
        try:
            urls = dict(zip(MODES, (a.url, one.url, two.url), strict=True))
            script = script_for(users)
            for url in urls.values():
                wrk(url, script, args.connections, 2)  # warm-up
            runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
            for _ in range(args.runs):  # alternated: drift in machine speed hits all modes
                for mode, url in urls.items():
                    runs[mode].append(wrk(url, script, args.connections, args.duration))
            models = [httpx.get(f"{r.url}/v1/model", timeout=10).json() for r in (a, b)]
        finally:
            one.stop()
            two.stop()
    modes: dict[str, dict[str, Any]] = {
        mode: {"median": median_run(r), "runs": r} for mode, r in runs.items()
    }
    direct = modes[MODES[0]]["median"]
    via = modes[MODES[1]]["median"]
    return {
        "users_in_mix": len(users),
        "num_items": models[0]["num_items"],
        "index": models[0]["index"],
        "recall_at_10": [m["details"].get("index_recall_at_10") for m in models],
        "load_seconds": [m["loaded_in_seconds"] for m in models],
        "modes": modes,
        "nginx_overhead": {
            "requests_per_s_ratio": round(via["requests_per_s"] / direct["requests_per_s"], 3),
            "p50_ms_added": round(via["p50_ms"] - direct["p50_ms"], 3),
            "p99_ms_added": round(via["p99_ms"] - direct["p99_ms"], 3),
        },
        "two_over_one_replica": round(
            modes[MODES[2]]["median"]["requests_per_s"] / via["requests_per_s"], 3
        ),
    }


# ----------------------------------------------------------------------------- freshness


def cross_replica_freshness(
    a: Replica, b: Replica, users: list[str], trials: int
) -> dict[str, Any]:
    """Event POSTed to A -> B's answer reflects it, ms from the POST's return."""
    waits_ms: list[float] = []
    gets: list[float] = []
    rng = np.random.default_rng(0)
    with httpx.Client(timeout=10) as http:
        for user in rng.choice(users, size=trials, replace=False).tolist():
            path = f"/v1/users/{user}/recommendations"
            first = http.get(f"{b.url}{path}", params={"k": 10}).json()
            http.get(f"{b.url}{path}", params={"k": 10})  # cached at B now
            item = first["items"][0]["item_id"]
            event = {"events": [{"user_id": user, "item_id": item}]}
            http.post(f"{a.url}/v1/events", json=event, headers=HEADERS).raise_for_status()
            posted = time.perf_counter()
            count = 0
            while True:
                count += 1
                body = http.get(f"{b.url}{path}", params={"k": 10}).json()
                if not body["cached"] and item not in {e["item_id"] for e in body["items"]}:
                    break
                if count > 10_000:
                    raise SystemExit(f"replica B never reflected {user}'s event")
            waits_ms.append((time.perf_counter() - posted) * 1000)
            gets.append(count)
    return {"ms": percentiles(waits_ms), "gets_needed": percentiles(gets)}


def promote_to_all(cluster: Cluster, users: list[str], trials: int) -> dict[str, Any]:
    """production alternates between two full versions; seconds until every replica has it."""
    from recloop.registry import Registry

    reg = Registry(cluster.registry, create=False)
    served = reg.production()
    assert served is not None
    other = next((v.id for v in reg.list() if v.id != served), None) or reg.compact(served)
    replicas = list(cluster.replicas.values())
    seconds = []
    nginx = nginx_for(cluster, replicas, "nginx-promote")
    try:
        with Traffic(nginx.url, users) as traffic, httpx.Client(timeout=10) as http:
            for trial in range(trials):
                target = other if trial % 2 == 0 else served
                started = time.perf_counter()
                reg.promote(target)
                while any(
                    http.get(f"{r.url}/v1/model").json()["version"] != target for r in replicas
                ):
                    if time.perf_counter() - started > 300:
                        raise SystemExit(f"replicas did not reach {target} in 300 s")
                    time.sleep(0.01)
                seconds.append(time.perf_counter() - started)
                print(f"  promote {target}: {seconds[-1]:.2f} s", flush=True)
                time.sleep(1.0)
    finally:
        nginx.stop()
    return {
        "seconds": percentiles(seconds),
        "follow_seconds": cluster.follow_seconds,
        "requests_during": sum(traffic.statuses.values()),
        "failed_during": sum(n for s, n in traffic.statuses.items() if s != 200),
        "statuses": {str(s): n for s, n in sorted(traffic.statuses.items())},
    }


def freshness(args: argparse.Namespace, log: Path) -> dict[str, Any]:
    registry, users, _ = beauty(log)
    print("[freshness: beauty, 2 replicas, cache on]", flush=True)
    with running_cluster("freshness", registry, ["--index", "exact"]) as cluster:
        a, b = cluster.replicas["a"], cluster.replicas["b"]
        events = cross_replica_freshness(a, b, users, args.trials)
        print(f"  event at A -> B: {events['ms']}", flush=True)
        promote = promote_to_all(cluster, users, args.promotions)
    return {"event_a_to_b": events, "promote": promote}


# ----------------------------------------------------------------------------- output


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[str, Any] = results.get("throughput", {})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels, rps, p99 = [], [], []
    for key, out in rows.items():
        for mode, value in out["modes"].items():
            labels.append(f"{key}\n{mode}")
            rps.append(value["median"]["requests_per_s"])
            p99.append(value["median"]["p99_ms"])
    x = np.arange(len(labels))
    axes[0].bar(x, rps, color="tab:blue")
    axes[0].set_ylabel("computed recommendations/s (median run)")
    axes[1].bar(x, p99, color="tab:orange")
    axes[1].set_ylabel("p99 latency (ms)")
    for ax in axes:
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"replicas behind nginx, Redis state (bench/results/{path.stem}.json)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(path: Path) -> str:
    data = json.loads(path.read_text())
    config, results = data["config"], data["results"]
    lines = [
        f"From `{path.relative_to(REPO)}` (commit {data['commit'][:12]}, {data['date']}; wrk "
        f"{config['connections']} connections, {config['runs']} runs of {config['duration_s']} s "
        "alternated, median run; every answer computed).",
        "",
        "| catalogue / index | recall@10 | mode | req/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, out in results.get("throughput", {}).items():
        recall = "/".join(f"{r:.3f}" for r in out["recall_at_10"] if r is not None)
        for mode, value in out["modes"].items():
            m = value["median"]
            lines.append(
                f"| {key} ({out['num_items']:,} items) | {recall} | {mode} "
                f"| {m['requests_per_s']:,.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} "
                f"| {m['errors']} |"
            )
        over = out["nginx_overhead"]
        lines.append(
            f"| {key} | | nginx overhead: {over['requests_per_s_ratio']:.2f}x req/s, "
            f"{over['p50_ms_added']:+.2f} ms p50; 2 replicas / 1: "
            f"{out['two_over_one_replica']:.2f}x | | | | |"
        )
    fresh = results.get("freshness")
    if fresh:
        ms, promote = fresh["event_a_to_b"]["ms"], fresh["promote"]
        lines += [
            "",
            f"Event at replica A -> reflected at replica B: p50 {ms['p50']:.1f} ms, "
            f"p99 {ms['p99']:.1f} ms, max {ms['max']:.1f} ms ({ms['n']} trials). "
            f"Promote -> both replicas serving it: p50 {promote['seconds']['p50']:.2f} s, "
            f"max {promote['seconds']['max']:.2f} s ({promote['seconds']['n']} promotions, "
            f"--follow {promote['follow_seconds']} s); {promote['failed_during']} of "
            f"{promote['requests_during']} requests through nginx failed meanwhile.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the table of NAME.json")
    parser.add_argument("--only", nargs="*", choices=sorted(CATALOGUES), default=sorted(CATALOGUES))
    parser.add_argument("--indexes", nargs="*", choices=sorted(INDEXES), default=DEFAULT_INDEXES)
    parser.add_argument(
        "--milvus",
        choices=("server", "lite"),
        default="server",
        help="server: one Milvus standalone server for the run (make bench-deps); lite: "
        "milvus-lite in each replica",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--trials", type=int, default=200, help="freshness trials")
    parser.add_argument("--promotions", type=int, default=6)
    parser.add_argument("--no-freshness", dest="freshness", action="store_false")
    parser.add_argument("--name", default="scale_serve")
    args = parser.parse_args()
    if args.table:
        print(table(RESULTS / f"{args.name}.json"))
        return
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: run `make system-deps`")
    started = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    log = RESULTS / f"{args.name}.log"
    log.unlink(missing_ok=True)
    results: dict[str, Any] = {"throughput": {}}
    config = run_config(args)
    with contextlib.ExitStack() as stack:
        milvus_uri = None
        if args.milvus == "server" and any(i.startswith("milvus") for i in args.indexes):
            milvus_uri = stack.enter_context(milvus_server(SCALE / "milvus-server"))
        for catalogue in args.only:
            for index in args.indexes:
                key = f"{catalogue} / {index}"
                results["throughput"][key] = throughput(catalogue, index, args, log, milvus_uri)
                # Written after every configuration: a later failure keeps what was measured.
                write_result(args.name, {**config, "complete": False}, results, started)
    if args.freshness:
        results["freshness"] = freshness(args, log)
    path = write_result(args.name, {**config, "complete": True}, results, started)
    plot(results, RESULTS / f"{args.name}.png")
    print(f"wrote {path}")
    print(table(path))


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "runs": args.runs,
        "duration_s": args.duration,
        "connections": args.connections,
        "request": "GET /v1/users/{random user}/recommendations?k=10, --no-cache",
        "replicas": "recloop serve --threads 1 --redis-url (state) --event-log (Redis stream)",
        "nginx": "deploy/nginx/recloop.conf, worker_processes auto",
        "milvus": (
            "one Milvus standalone server (pip milvus==2.3.5), an alias per replica"
            if args.milvus == "server"
            else "milvus-lite (embedded, one per replica)"
        ),
    }


if __name__ == "__main__":
    main()
