"""Issue 22: a 10M-item synthetic catalogue served from Milvus (milvus-lite): build time,
memory, query latency, recall@10 against exact on a sample.

The catalogue: --items rows of dim 64 (the dimension recloop's SASRec configs serve:
configs/*/sasrec.toml, bench/scale_worker.py), float32, generated in chunks of CHUNK rows from
seeded generators (one per chunk, so the table does not depend on the chunking). An item is a
unit direction near one of CLUSTERS centres (cluster sizes Zipf-like) times a log-normal norm
(popularity), so inner-product neighbourhoods are clustered and skewed as trained item tables
are. A query is a user: a history of HISTORY items from one to three clusters; the query vector
is a recency-weighted mix of the last RECENT history items plus noise, and the whole history is
its exclusion list (the items nearest the query, as in serving).

The index is built through the product code path, `recloop.serve.indexes.milvus.MilvusIndex`
on a milvus-lite .db folder (insert, flush, create_index, load, then its own recall probe on
TUNE_QUERIES queries). The bench only wraps the client to time each phase and print progress.
milvus-lite 3.x runs inside this process (a gRPC server on threads, no child process): RSS is
this process plus any children, sampled every SAMPLE_SECONDS.

Latency: `index.search` calls of batch 1 and 32, with and without the history as exclusions,
each cell up to --latency-queries queries or --latency-budget seconds (at least MIN_CALLS calls),
after one untimed warm-up call. recall@10: --recall-queries queries searched in batches of 32,
against an exact blocked matmul over the whole table (with and without exclusions).
--ann TYPE builds a second collection with that index type (e.g. IVF_FLAT, --nlist) and
measures recall and latency at each --nprobe.

    .venv/bin/python bench/scale_catalogue.py                           # 10M items, FLAT
    .venv/bin/python bench/scale_catalogue.py --ann IVF_FLAT --nprobe 4 16
    .venv/bin/python bench/scale_catalogue.py --items 200000 --name scale_serve-catalogue-quick
    .venv/bin/python bench/scale_catalogue.py --table                   # markdown, from the JSON
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, RESULTS, write_result
from recloop.serve.indexes import milvus
from recloop.serve.indexes.base import recall_at_k
from recloop.serve.indexes.milvus import MilvusIndex

DIM = 64  # what recloop's SASRec configs serve (configs/*/sasrec.toml: dim = 64)
CHUNK = 1 << 20  # rows generated (and scored exactly) at a time
CLUSTERS = 4096
CLUSTER_SKEW = 0.8  # cluster weight ~ 1 / (rank + 10) ** CLUSTER_SKEW
SPREAD = 0.7  # item direction = centre + SPREAD * N(0, I / dim), then normalised
NORM_SIGMA = 0.35  # item norm = exp(N(0, NORM_SIGMA)): popularity
HISTORY = 50  # a user's history: the exclusion list
RECENT = 8  # the query mixes the last RECENT history items, newest weighted most
QUERY_NOISE = 0.3  # noise added to the query, relative to its norm
K = 10
BATCHES = (1, 32)
RECALL_BATCH = 32
TUNE_QUERIES = 32  # what MilvusIndex measures its own recall on at build
MIN_CALLS = 3
SAMPLE_SECONDS = 0.25
GIB = 2**30


class Progress:
    """Periodic lines with rate and ETA (every PRINT_SECONDS and at the end)."""

    PRINT_SECONDS = 10.0

    def __init__(self, label: str, total: int, unit: str = "rows") -> None:
        self.label, self.total, self.unit = label, total, unit
        self.done = 0
        self.started = self.printed = time.perf_counter()

    def update(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if now - self.printed >= self.PRINT_SECONDS or self.done >= self.total:
            self.printed = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate else math.inf
            print(
                f"  {self.label}: {self.done:,}/{self.total:,} {self.unit} "
                f"({100 * self.done / self.total:.0f}%), {rate:,.0f} {self.unit}/s, "
                f"elapsed {now - self.started:.0f} s, ETA {eta:.0f} s",
                flush=True,
            )


class MemorySampler:
    """Peak RSS of this process plus its children, per phase, sampled on a thread."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self.children_seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_info().rss
                self.children_seen.add(child.name())
            except psutil.NoSuchProcess:
                continue
        return int(total)

    def sample(self) -> int:
        value = self.rss()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), value)
        return value

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.sample()

    @contextmanager
    def during(self, phase: str) -> Iterator[None]:
        self.phase = phase
        self.sample()
        try:
            yield
        finally:
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- the catalogue


def cluster_weights() -> np.ndarray:
    weights = 1.0 / (np.arange(CLUSTERS) + 10.0) ** CLUSTER_SKEW
    normalised: np.ndarray = weights / weights.sum()
    return normalised


def generate(items: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(table [items + 1, DIM] float32 with row 0 zero padding, cluster of each row [items + 1])."""
    centres = np.random.default_rng([seed, 0]).normal(size=(CLUSTERS, DIM)) / math.sqrt(DIM)
    weights = cluster_weights()
    table = np.zeros((items + 1, DIM), dtype=np.float32)
    clusters = np.full(items + 1, -1, dtype=np.int32)
    progress = Progress("generate", items)
    for chunk, start in enumerate(range(1, items + 1, CHUNK)):
        stop = min(start + CHUNK, items + 1)
        rng = np.random.default_rng([seed, 1, chunk])
        n = stop - start
        which = rng.choice(CLUSTERS, size=n, p=weights)
        direction = centres[which] + SPREAD * rng.normal(size=(n, DIM)) / math.sqrt(DIM)
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        norms = np.exp(NORM_SIGMA * rng.normal(size=(n, 1)))
        table[start:stop] = direction * norms  # [n, DIM]
        clusters[start:stop] = which
        progress.update(n)
    return table, clusters


def users(
    table: np.ndarray, clusters: np.ndarray, count: int, seed: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(queries [count, DIM] float32, histories: count arrays of HISTORY item ids)."""
    rng = np.random.default_rng([seed, 2])
    order = np.argsort(clusters[1:], kind="stable") + 1  # item ids grouped by cluster
    bounds = np.searchsorted(clusters[order], np.arange(CLUSTERS + 1))
    weights = cluster_weights()
    queries = np.empty((count, DIM), dtype=np.float32)
    histories = []
    recency = 0.7 ** np.arange(RECENT)[::-1]  # the newest (last) weighs most
    for user in range(count):
        interests = rng.choice(CLUSTERS, size=int(rng.integers(1, 4)), replace=False, p=weights)
        members = np.concatenate([order[bounds[c] : bounds[c + 1]] for c in interests])
        members = members if len(members) else np.arange(1, len(table))
        history = rng.choice(members, size=HISTORY, replace=len(members) < HISTORY)
        mixed = recency @ table[history[-RECENT:]] / recency.sum()  # [DIM]
        noise = rng.normal(size=DIM) * QUERY_NOISE * np.linalg.norm(mixed) / math.sqrt(DIM)
        queries[user] = mixed + noise
        histories.append(np.unique(history))
    return queries, histories


def exact_truth(
    table: np.ndarray, queries: np.ndarray, histories: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-K ids without and with the exclusions: one blocked matmul over the table."""
    batch = len(queries)
    best: list[tuple[torch.Tensor, torch.Tensor]] = [
        (torch.full((batch, K), -math.inf), torch.zeros((batch, K), dtype=torch.int64))
        for _ in range(2)
    ]
    rows = np.repeat(np.arange(batch), [len(h) for h in histories])
    ids = np.concatenate(histories)
    order = np.argsort(ids, kind="stable")
    rows, ids = rows[order], ids[order]
    q = torch.from_numpy(queries)
    items = len(table) - 1
    progress = Progress("exact", items)
    for start in range(1, items + 1, CHUNK // 4):
        stop = min(start + CHUNK // 4, items + 1)
        scores = q @ torch.from_numpy(table[start:stop]).T  # [B, n]
        for variant in (0, 1):
            if variant == 1:
                lo, hi = np.searchsorted(ids, [start, stop])
                scores[rows[lo:hi], ids[lo:hi] - start] = -math.inf
            top = torch.topk(scores, min(K, stop - start), dim=1)
            merged_scores = torch.cat([best[variant][0], top.values], dim=1)
            merged_ids = torch.cat([best[variant][1], top.indices + start], dim=1)
            keep = torch.topk(merged_scores, K, dim=1).indices
            best[variant] = (merged_scores.gather(1, keep), merged_ids.gather(1, keep))
        progress.update(stop - start)
    return best[0][1].numpy(), best[1][1].numpy()


# --------------------------------------------------------------------------- the index


def instrument(phases: dict[str, float], items: int) -> Callable[[], None]:
    """Wraps milvus._connect so the client MilvusIndex builds with times its phases and
    prints insert progress; returns the function that undoes it."""
    original = milvus._connect

    def connect(uri: str) -> Any:
        client = original(uri)
        progress = Progress("insert", items)

        def timed(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    phases[name] = phases.get(name, 0.0) + time.perf_counter() - started
                    if name == "insert_s":
                        progress.update(len(args[1]))

            return call

        client.insert = timed("insert_s", client.insert)
        client.flush = timed("flush_s", client.flush)
        client.create_index = timed("create_index_s", client.create_index)
        client.load_collection = timed("load_s", client.load_collection)
        return client

    milvus._connect = connect

    def undo() -> None:
        milvus._connect = original

    return undo


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def segments(index: MilvusIndex) -> dict[str, Any]:
    """How milvus-lite holds the collection (its internals: a diagnostic, None if they moved)."""
    try:
        from milvus_lite.server_manager import server_manager_instance

        for _server, db, _port in list(server_manager_instance._servers.values()):
            if not db.has_collection(index.collection):
                continue  # another .db folder's server (an earlier build)
            collection = db.get_collection(index.collection)
            cache = list(collection._segment_cache.values())
            kinds = sorted({type(i).__name__ for s in cache for i in s.indexes.values()})
            return {
                "segments": len(cache),
                "segments_indexed": sum(1 for s in cache if s.indexes.get("vector") is not None),
                "rows_largest_segment": max((s.num_rows for s in cache), default=0),
                "index_classes": kinds,
            }
    except Exception as exc:  # internals of another package: report, never fail the bench
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"error": "no milvus-lite server in this process"}


def build(
    table: np.ndarray,
    queries: np.ndarray,
    work: Path,
    memory: MemorySampler,
    label: str,
    index_type: str,
    index_params: dict[str, Any],
    search_params: dict[str, Any],
) -> tuple[MilvusIndex, dict[str, Any]]:
    phases: dict[str, float] = {}
    folder = work / f"{label}.db"
    undo = instrument(phases, len(table) - 1)
    print(f"building {label}: {index_type} {index_params} -> {folder}", flush=True)
    started = time.perf_counter()
    try:
        with memory.during(f"build_{label}"):
            index = MilvusIndex(
                table,
                uri=str(folder),
                alias=f"bench_{label}",
                tune_queries=queries[:TUNE_QUERIES],
                index_type=index_type,
                index_params=index_params,
                search_params=search_params,
            )
    finally:
        undo()
    total = time.perf_counter() - started
    known = sum(phases.values())
    report = {
        "index_type": index_type,
        "index_params": index_params,
        "build_s": round(total, 2),
        "phases_s": {name: round(value, 2) for name, value in phases.items()},
        # check_table, the insert rows' tolist, create_collection, alias, recall probe
        "other_s": round(total - known, 2),
        "build_recall_at_10": index.recall,
        "build_recall_queries": TUNE_QUERIES,
        "disk_bytes": folder_bytes(folder),
        "rss_after_build_bytes": memory.sample(),
        "layout": segments(index),
    }
    print(f"  built in {total:.0f} s: {json.dumps(report['phases_s'])}", flush=True)
    return index, report


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def latency(
    index: MilvusIndex,
    queries: np.ndarray,
    histories: list[np.ndarray],
    batch: int,
    exclude: bool,
    max_queries: int,
    budget_s: float,
) -> dict[str, Any]:
    calls = max(MIN_CALLS, max_queries // batch)
    times: list[float] = []
    index.search(queries[:batch], K, histories[:batch] if exclude else None)  # warm-up
    spent = 0.0
    for call in range(calls):
        start = (call * batch) % (len(queries) - batch + 1)
        chunk = queries[start : start + batch]
        lists = histories[start : start + batch] if exclude else None
        began = time.perf_counter()
        index.search(chunk, K, lists)
        times.append(time.perf_counter() - began)
        spent += times[-1]
        if spent >= budget_s and len(times) >= MIN_CALLS:
            break
    ms = [1e3 * t for t in times]
    cell = {
        "batch": batch,
        "exclude": HISTORY if exclude else 0,
        "calls": len(ms),
        "queries": len(ms) * batch,
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "mean_ms": float(np.mean(ms)),
        "max_ms": max(ms),
        "per_query_p50_ms": percentile(ms, 50) / batch,
        "call_ms": [round(v, 3) for v in ms],
    }
    print(
        f"  batch {batch:>2} exclude {cell['exclude']:>2}: p50 {cell['p50_ms']:.1f} ms, "
        f"p99 {cell['p99_ms']:.1f} ms over {len(ms)} calls",
        flush=True,
    )
    return cell


def recall(
    index: MilvusIndex,
    queries: np.ndarray,
    histories: list[np.ndarray],
    truth: np.ndarray,
    exclude: bool,
) -> float:
    found = []
    progress = Progress(f"recall{' (exclude)' if exclude else ''}", len(queries), "queries")
    for start in range(0, len(queries), RECALL_BATCH):
        chunk = queries[start : start + RECALL_BATCH]
        lists = histories[start : start + RECALL_BATCH] if exclude else None
        found.append(index.search(chunk, K, lists)[0])
        progress.update(len(chunk))
    return recall_at_k(np.concatenate(found), truth)


def measure(
    index: MilvusIndex,
    queries: np.ndarray,
    histories: list[np.ndarray],
    truth: tuple[np.ndarray, np.ndarray],
    args: argparse.Namespace,
    excludes: tuple[bool, ...],
    memory: MemorySampler,
    label: str,
) -> dict[str, Any]:
    with memory.during(f"search_{label}"):
        sample = slice(0, args.recall_queries)
        recalls = {
            f"recall_at_10{'_exclude' if ex else ''}": recall(
                index, queries[sample], histories[sample], truth[int(ex)][sample], ex
            )
            for ex in excludes
        }
        print(f"  {label} {index.search_params}: {json.dumps(recalls)}", flush=True)
        cells = [
            latency(index, queries, histories, b, ex, args.latency_queries, args.latency_budget)
            for b in BATCHES
            for ex in excludes
        ]
    return {"search_params": dict(index.search_params), **recalls, "latency": cells}


# --------------------------------------------------------------------------- report


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for setting in results["settings"]:
        for batch, marker in zip(BATCHES, ("o", "s"), strict=True):
            cell = next(c for c in setting["latency"] if c["batch"] == batch and c["exclude"] == 0)
            name = setting["index_type"] + "".join(
                f" {k}={v}" for k, v in setting["search_params"].items()
            )
            left.scatter(setting["recall_at_10"], cell["per_query_p50_ms"], marker=marker)
            left.annotate(
                f"{name}, b{batch}",
                (setting["recall_at_10"], cell["per_query_p50_ms"]),
                fontsize=7,
                xytext=(4, 2),
                textcoords="offset points",
            )
    left.set_xlabel("recall@10 vs exact")
    left.set_ylabel("p50 ms per query (call p50 / batch)")
    left.set_yscale("log")
    left.set_title("latency vs recall (o: batch 1, s: batch 32)")
    flat = results["settings"][0]
    labels = [f"b{c['batch']} ex{c['exclude']}" for c in flat["latency"]]
    right.boxplot([c["call_ms"] for c in flat["latency"]], tick_labels=labels)
    right.set_ylabel("ms per search call")
    right.set_title(f"{flat['index_type']}: call latency distribution")
    items = results["items"]
    fig.suptitle(f"milvus-lite, {items:,} items x {DIM}, recloop MilvusIndex")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(path: Path) -> str:
    payload = json.loads(path.read_text())
    res, builds = payload["results"], payload["results"]["builds"]
    lines = [
        f"From `{path.relative_to(REPO)}` (commit {payload['commit'][:12]}, {payload['date']}; "
        f"{res['items']:,} items x {payload['config']['dim']}, milvus-lite "
        f"{payload['config']['milvus_versions']['milvus-lite']}, "
        f"{payload['machine']['cores']} cores).",
        "",
        "| build | build s | insert s | flush s | create_index s | load s | other s "
        "| disk GiB | segments (indexed) | build recall@10 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in builds:
        p, lay = b["phases_s"], b["layout"]
        seg = f"{lay.get('segments', '?')} ({lay.get('segments_indexed', '?')})"
        lines.append(
            f"| {b['index_type']} {json.dumps(b['index_params'])} | {b['build_s']:.0f} | "
            f"{p.get('insert_s', 0):.0f} | {p.get('flush_s', 0):.0f} | "
            f"{p.get('create_index_s', 0):.0f} | {p.get('load_s', 0):.1f} | {b['other_s']:.0f} | "
            f"{b['disk_bytes'] / GIB:.2f} | {seg} | {b['build_recall_at_10']:.3f} |"
        )
    lines += [
        "",
        "| phase | peak RSS GiB (process + children) |",
        "|---|---|",
        *[f"| {k} | {v / GIB:.2f} |" for k, v in res["peak_rss_bytes"].items()],
        "",
        "| index | search params | recall@10 | recall@10 excl. | latency cell | calls "
        "| p50 ms | p99 ms | p50 ms / query |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in res["settings"]:
        excl = s.get("recall_at_10_exclude")
        for c in s["latency"]:
            lines.append(
                f"| {s['index_type']} | {json.dumps(s['search_params'])} | "
                f"{s['recall_at_10']:.4f} | {'-' if excl is None else f'{excl:.4f}'} | "
                f"batch {c['batch']}, exclude {c['exclude']} | {c['calls']} | "
                f"{c['p50_ms']:.1f} | {c['p99_ms']:.1f} | {c['per_query_p50_ms']:.2f} |"
            )
    lines.append("")
    lines.append(
        f"recall on {payload['config']['recall_queries']} queries; p99 of n calls is "
        "np.percentile over n (with few calls it is close to the max)."
    )
    return "\n".join(lines)


def milvus_versions() -> dict[str, str]:
    from importlib import metadata

    return {name: metadata.version(name) for name in ("pymilvus", "milvus-lite", "faiss-cpu")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="scale_serve-catalogue", help="results file stem")
    parser.add_argument("--recall-queries", type=int, default=200)
    parser.add_argument("--latency-queries", type=int, default=300, help="most per cell")
    parser.add_argument("--latency-budget", type=float, default=60.0, help="seconds per cell")
    parser.add_argument("--ann", help="also build this index type (IVF_FLAT, IVF_SQ8, HNSW)")
    parser.add_argument("--nlist", type=int, default=1024, help="IVF lists per segment")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32], help="IVF sweep")
    parser.add_argument("--ann-budget", type=float, default=30.0, help="seconds per ANN cell")
    parser.add_argument("--work", type=Path, help="folder for the .db (default: a temp dir)")
    parser.add_argument("--table", action="store_true", help="print the table from the JSON")
    args = parser.parse_args()
    if args.table:
        print(table(RESULTS / f"{args.name}.json"))
        return
    started = time.perf_counter()
    memory = MemorySampler()
    work = Path(tempfile.mkdtemp(prefix="recloop-catalogue-", dir=args.work))
    results: dict[str, Any] = {"items": args.items, "stages_done": []}

    def save(stage: str) -> Path:
        """Writes the JSON and PNG with what is measured so far (a later failure keeps it)."""
        results["stages_done"].append(stage)
        results["peak_rss_bytes"] = dict(memory.peaks)
        path = write_result(args.name, run_config(args, memory), results, started)
        if results.get("settings"):
            plot(results, RESULTS / f"{args.name}.png")
        return path

    try:
        with memory.during("generate"):
            began = time.perf_counter()
            table_, clusters = generate(args.items, args.seed)
            count = max(args.recall_queries, args.latency_queries, RECALL_BATCH)
            queries, histories = users(table_, clusters, count, args.seed)
            results["generate_s"] = round(time.perf_counter() - began, 2)
            results["table_bytes"] = int(table_.nbytes)
        del clusters
        with memory.during("exact"):
            began = time.perf_counter()
            sample = slice(0, args.recall_queries)
            truth = exact_truth(table_, queries[sample], histories[sample])
            results["exact_truth_s"] = round(time.perf_counter() - began, 2)
        builds: list[dict[str, Any]] = []
        settings: list[dict[str, Any]] = []
        results["builds"], results["settings"] = builds, settings
        index, report = build(table_, queries, work, memory, "flat", "FLAT", {}, {})
        builds.append(report)
        flat = measure(index, queries, histories, truth, args, (False, True), memory, "flat")
        settings.append({"index_type": "FLAT", **flat})
        index.close()
        path = save("flat")
        if args.ann:
            index_params = {"nlist": args.nlist} if args.ann.startswith("IVF") else {}
            key = "nprobe" if args.ann.startswith("IVF") else "ef"
            ann_args = argparse.Namespace(**{**vars(args), "latency_budget": args.ann_budget})
            index, report = build(
                table_, queries, work, memory, "ann", args.ann, index_params, {key: args.nprobe[0]}
            )
            builds.append(report)
            for value in args.nprobe:
                index.search_params = {key: value}
                ann = measure(index, queries, histories, truth, ann_args, (False,), memory, "ann")
                settings.append({"index_type": args.ann, **ann})
            index.close()
            path = save("ann")
    finally:
        memory.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(table(path))


def run_config(args: argparse.Namespace, memory: MemorySampler) -> dict[str, Any]:
    return {
        "items": args.items,
        "dim": DIM,
        "seed": args.seed,
        "generator": {
            "chunk": CHUNK,
            "clusters": CLUSTERS,
            "cluster_skew": CLUSTER_SKEW,
            "spread": SPREAD,
            "norm_sigma": NORM_SIGMA,
            "history": HISTORY,
            "recent": RECENT,
            "query_noise": QUERY_NOISE,
        },
        "k": K,
        "recall_queries": args.recall_queries,
        "latency_queries": args.latency_queries,
        "latency_budget_s": args.latency_budget,
        "ann": args.ann,
        "nlist": args.nlist if args.ann else None,
        "nprobe": args.nprobe if args.ann else None,
        "ann_budget_s": args.ann_budget if args.ann else None,
        "milvus_versions": milvus_versions(),
        "milvus_lite_in_process": not memory.children_seen,
        "children_seen": sorted(memory.children_seen),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": list(os.getloadavg()),
    }


if __name__ == "__main__":
    main()
