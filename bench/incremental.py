"""Incremental HSTU encoding (cached keys and values) vs full re-encode: time and drift.

Three parts, torch on 1 thread (ONNX Runtime 1 thread), HSTU dim 64, 2 blocks, 2 heads,
position_embedding "none", untimed (serving sends no timestamps):

- encode: time of one request (batch 1) after one new event, at max_length L = 50, 200, 1000
  (random weights: the time does not depend on them). Full re-encode of the window (torch
  eager; the ONNX engine, serving's default) vs incremental: while the window fills (exact),
  once it is full with the "recompute" policy (exact: a full re-encode) and with "drop-oldest"
  (approximate), and the served path (KV store read + decode, encode, encode + store write).
- drift: "drop-oldest" against a full re-encode on a model trained on synthetic data: cosine
  of the user vectors and overlap of the top-10 items, after 1, 10, 50 and 100 slides.
- serving: the in-process service (Service, no HTTP, result cache on) under 16 concurrent
  clients, each request one new event for a user and then that user's recommendations; users
  whose window is filling (100-120 of max_length 200 items, or 600-620 of 1000 on a random
  HSTU) and users whose window is full (200 of 300 items).

    flock /tmp/recloop-cpu.lock .venv/bin/python bench/incremental.py
    .venv/bin/python bench/incremental.py --table
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, write_result
from recloop.models.hstu import HSTU, HSTUConfig
from recloop.models.hstu_kv import IncrementalHSTU
from recloop.serve.incremental import IncrementalEncoding, encode_state
from recloop.serve.state.kv import MemoryKVStore

MODEL = {"dim": 64, "num_blocks": 2, "num_heads": 2, "dropout": 0.0, "use_time_bias": False}
NUM_ITEMS = 1000
SERVE_LENGTH = 200
SLIDES = (1, 10, 50, 100)


def _median_us(function: Any, reps: int) -> float:
    function()  # warm
    times = []
    for _ in range(reps):
        started = time.perf_counter_ns()
        function()
        times.append(time.perf_counter_ns() - started)
    return round(float(np.median(times)) / 1000, 1)


def encode_times(length: int, reps: int) -> dict[str, Any]:
    """Median microseconds per request at max_length ``length`` (one new event)."""
    from recloop.serve.engines.factory import build_engine

    torch.manual_seed(0)
    config = HSTUConfig(num_items=NUM_ITEMS, max_length=length, position_embedding="none", **MODEL)
    model = HSTU(config).eval()
    ids = torch.randint(1, NUM_ITEMS + 1, (length + 1,))
    exact, drop = IncrementalHSTU(model), IncrementalHSTU(model, "drop-oldest")
    (filling,) = exact.prefill([ids[: length - 1]])  # one short of full
    (full,) = exact.prefill([ids[:length]])
    new = ids[length:]
    window = ids[1:]
    engine = build_engine(model, kind="onnx", max_batch=1, threads=1, label=f"L={length}")
    store = MemoryKVStore()
    served = IncrementalEncoding(model, "bench", store)
    # The served path while the window fills: a state of L - 2 items, a sequence of L - 1.
    payload = encode_state(exact.prefill([ids[: length - 2]])[0])
    sequence = ids[: length - 1].numpy()

    def served_request() -> None:
        store.put("bench", "u", payload)
        served.encode(["u"], [sequence], engine.encode)

    with torch.inference_mode():
        times = {
            "full_torch": _median_us(lambda: model.encode(window[None]), reps),
            "full_onnx": _median_us(lambda: engine.encode([window.numpy()]), reps),
            "incremental_filling": _median_us(lambda: exact.encode([filling], [new]), reps),
            "window_full_recompute": _median_us(lambda: exact.encode([full], [new]), reps),
            "window_full_drop_oldest": _median_us(lambda: drop.encode([full], [new]), reps),
            "served_incremental": _median_us(served_request, reps),
        }
    return {"length": length, "median_us": times, "state_bytes": len(payload)}


# ------------------------------------------------------------------ trained model


def train_model(root: Path) -> tuple[Path, Path, str]:
    """(dataset, registry, version): HSTU (position_embedding none, max_length 200) trained
    briefly on synthetic data with long sequences."""
    from recloop.config import config_from_dict
    from recloop.data.prepare import prepare, with_source_order
    from recloop.data.synthetic import SyntheticConfig, generate_events
    from recloop.train.trainer import train

    synthetic = SyntheticConfig(
        num_users=1500, num_items=NUM_ITEMS, mean_length=150.0, max_length=400, seed=0
    )
    data = root / "data"
    prepare(with_source_order(generate_events(synthetic)), {"kind": "synthetic"}, data)
    model = {"type": "hstu", "position_embedding": "none", **MODEL}
    train_config = {"batch_size": 32, "max_length": SERVE_LENGTH, "lr": 3e-3, "warmup_steps": 10}
    steps = {"max_steps": 150, "eval_every_steps": 150, "seed": 0}
    config = config_from_dict({"model": model, "train": {**train_config, **steps}})
    result = train(config, data, root / "run", registry_dir=root / "registry", show_progress=False)
    if result.version is None:
        raise SystemExit("training published no version")
    return data, root / "registry", result.version


def drift(registry: Path, version: str, data: Path, users: int) -> dict[str, Any]:
    """drop-oldest vs full re-encode after each number of slides in SLIDES."""
    from recloop.data.dataset import SequenceDataset
    from recloop.registry import Registry
    from recloop.registry.loading import load_model

    model, _ = load_model(Registry(registry), version)
    model.eval()
    length = int(model.config.max_length)
    dataset = SequenceDataset(data)
    offsets, items = dataset.sequences.offsets, dataset.sequences.items
    long = [u for u in range(len(offsets) - 1) if offsets[u + 1] - offsets[u] > length + 10]
    drop = IncrementalHSTU(model, "drop-oldest")
    cosines: dict[int, list[float]] = {slides: [] for slides in SLIDES}
    overlaps: dict[int, list[float]] = {slides: [] for slides in SLIDES}
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        for user in long[:users]:
            sequence = torch.from_numpy(np.array(items[offsets[user] : offsets[user + 1]]))
            extra = torch.from_numpy(rng.integers(1, NUM_ITEMS + 1, size=max(SLIDES)))
            sequence = torch.cat([sequence[:length], extra])  # then new events, one at a time
            (state,) = drop.prefill([sequence[:length]])
            for step in range(1, max(SLIDES) + 1):
                vector, (state,) = drop.encode([state], [sequence[length + step - 1 :][:1]])
                if step in cosines:
                    window = sequence[step : length + step][None]
                    reference = model.encode(window)[0]
                    cosines[step].append(float(torch.dot(vector[0], reference)))
                    overlaps[step].append(_top10_overlap(model, vector[0], reference))
    return {
        "users": len(cosines[SLIDES[0]]),
        "max_length": length,
        "after_slides": {
            str(slides): {
                "cosine_mean": round(float(np.mean(cosines[slides])), 5),
                "cosine_min": round(float(np.min(cosines[slides])), 5),
                "top10_overlap_mean": round(float(np.mean(overlaps[slides])), 3),
            }
            for slides in SLIDES
        },
    }


def _top10_overlap(model: Any, left: torch.Tensor, right: torch.Tensor) -> float:
    top = [set(model.score(vector[None])[0].topk(10).indices.tolist()) for vector in (left, right)]
    return len(top[0] & top[1]) / 10


# ------------------------------------------------------------------ serving


async def serve_rate(
    registry: Path, version: str, variant: str, start_length: int, requests: int
) -> dict[str, Any]:
    """Requests/s of (one new event, then the user's recommendations) over 16 clients."""
    from recloop.events import Event
    from recloop.serve.bundle import LoadOptions
    from recloop.serve.service import Service, ServiceConfig

    engine, incremental, window = {
        "full (onnx)": ("onnx", False, "recompute"),
        "full (torch)": ("torch", False, "recompute"),
        # The engine (ONNX, the default) still encodes what the cache cannot help with.
        "incremental recompute": ("onnx", True, "recompute"),
        "incremental drop-oldest": ("onnx", True, "drop-oldest"),
    }[variant]
    load = LoadOptions(
        engine=engine,
        threads=1,
        incremental_encoding=incremental,
        incremental_window=window,
        cache_dir=registry.parent / "onnx-cache",  # one ONNX export per model, not per run
    )
    # The state store keeps every event here: a shorter bound slides the sequence (see
    # recloop.serve.incremental.plan), and the benchmark is about the window.
    config = ServiceConfig(registry=registry, ref=version, load=load, state_max_length=1200)
    service = Service(config)
    await service.start()
    try:
        raw = service.bundle.to_raw(np.arange(1, NUM_ITEMS + 1, dtype=np.int64))
        rng = np.random.default_rng(1)
        users = [f"bench-{start_length}-{u}" for u in range(64)]
        history = [
            Event(u, raw[i], 0.0) for u in users for i in rng.integers(0, 1000, start_length)
        ]
        await service.accept_events(history)
        for user in users:  # first request: a full encode (and the KV state stored)
            await service.user_recommendations(user, 10, exclude_seen=False)

        async def client(number: int) -> None:
            for request in range(number, requests, 16):
                user = users[request % len(users)]
                await service.accept_events([Event(user, raw[request % NUM_ITEMS], 1.0)])
                await service.user_recommendations(user, 10, exclude_seen=False)

        started = time.perf_counter()
        await asyncio.gather(*(client(number) for number in range(16)))
        seconds = time.perf_counter() - started
        counts = service.bundle.incremental.status() if service.bundle.incremental else None
    finally:
        await service.stop()
    return {"requests_per_s": round(requests / seconds, 1), "incremental": counts}


def long_registry(root: Path) -> tuple[Path, str]:
    """HSTU at max_length 1000 with random weights (speed only), published as a version."""
    from bench.freshness import publish_numbered
    from recloop.registry import Registry

    torch.manual_seed(0)
    config = HSTUConfig(num_items=NUM_ITEMS, max_length=1000, position_embedding="none", **MODEL)
    publish_numbered(HSTU(config), root, root / "registry")
    return root / "registry", Registry(root / "registry").resolve("latest")


def serving(
    trained: tuple[Path, str], long: tuple[Path, str], requests: int, rounds: int
) -> dict[str, Any]:
    full, fresh = ("full (onnx)", "full (torch)"), ("incremental recompute",)
    populations = {
        "L=200, window filling (100 items + events)": (trained, 100, requests, (*full, *fresh)),
        "L=200, window full (300 items)": (
            trained,
            300,
            requests,
            (*full, *fresh, "incremental drop-oldest"),
        ),
        "L=1000 (random weights), window filling (600 items + events)": (
            long,
            600,
            requests // 4,
            (*full, *fresh),
        ),
    }
    # Rounds of every measurement in turn, the median reported: a shared machine's speed
    # changes from minute to minute, and alternation spreads that over all of them.
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for population, ((registry, version), start, count, variants) in populations.items():
            for variant in variants:
                done = asyncio.run(serve_rate(registry, version, variant, start, count))
                runs.setdefault((population, variant), []).append(done)
    results: dict[str, Any] = {}
    for (population, variant), done in runs.items():
        rates = [run["requests_per_s"] for run in done]
        results.setdefault(population, {})[variant] = {
            "requests_per_s": round(float(np.median(rates)), 1),
            "runs": rates,
            "incremental": done[-1]["incremental"],
        }
    return results


# ------------------------------------------------------------------ output


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    lengths = [row["length"] for row in results["encode"]]
    for method in results["encode"][0]["median_us"]:
        times = [row["median_us"][method] / 1000 for row in results["encode"]]
        axes[0].plot(lengths, times, marker="o", label=method)
    axes[0].set(xscale="log", yscale="log", xlabel="max_length L", ylabel="ms per request")
    axes[0].set_title("encode after one new event (batch 1)")
    axes[0].legend(fontsize=7)
    slides = list(results["drift"]["after_slides"])
    values = [results["drift"]["after_slides"][s] for s in slides]
    axes[1].plot(slides, [v["cosine_mean"] for v in values], marker="o", label="cosine (mean)")
    axes[1].plot(
        slides, [v["top10_overlap_mean"] for v in values], marker="o", label="top-10 overlap"
    )
    axes[1].set(xlabel="window slides", title="drop-oldest vs full re-encode (L=200)")
    axes[1].legend(fontsize=7)
    labels, rates = [], []
    for population, variants in results["serving"].items():
        for variant, value in variants.items():
            labels.append(f"{population.split(' (')[0]}\n{variant}")
            rates.append(value["requests_per_s"])
    axes[2].bar(np.arange(len(labels)), rates)
    axes[2].set_xticks(np.arange(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    axes[2].set(ylabel="requests/s", title="event + recommendations, in-process service")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(path: Path) -> str:
    data = json.loads(path.read_text())
    results = data["results"]
    methods = list(results["encode"][0]["median_us"])
    lines = [
        f"From `bench/results/{path.name}` (commit {data['commit'][:12]}, {data['date']}).",
        "",
        "Encode, ms per request after one new event (median):",
        "",
        "| L | " + " | ".join(methods) + " | state bytes |",
        "|---|" + "---|" * (len(methods) + 1),
    ]
    for row in results["encode"]:
        times = " | ".join(f"{row['median_us'][m] / 1000:.3f}" for m in methods)
        lines.append(f"| {row['length']} | {times} | {row['state_bytes']:,} |")
    drift = results["drift"]
    lines += [
        "",
        f"drop-oldest vs full re-encode ({drift['users']} users, L={drift['max_length']}):",
        "",
        "| slides | cosine mean | cosine min | top-10 overlap |",
        "|---|---|---|---|",
    ]
    for slides, value in drift["after_slides"].items():
        lines.append(
            f"| {slides} | {value['cosine_mean']:.5f} | {value['cosine_min']:.5f} "
            f"| {value['top10_overlap_mean']:.3f} |"
        )
    lines += [
        "",
        "Serving (one event, then the user's recommendations), requests/s, median of rounds:",
        "",
        "| users | variant | req/s | rounds |",
        "|---|---|---|---|",
    ]
    for population, variants in results["serving"].items():
        for variant, value in variants.items():
            runs = ", ".join(f"{rate:,.0f}" for rate in value.get("runs", []))
            lines.append(f"| {population} | {variant} | {value['requests_per_s']:,.1f} | {runs} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the table of NAME.json")
    parser.add_argument("--name", default="incremental")
    parser.add_argument("--lengths", type=int, nargs="*", default=[50, 200, 1000])
    parser.add_argument("--reps", type=int, default=30, help="timed calls per method")
    parser.add_argument("--drift-users", type=int, default=50)
    parser.add_argument("--requests", type=int, default=1280, help="per serving measurement")
    parser.add_argument("--rounds", type=int, default=3, help="serving: runs of each (median)")
    args = parser.parse_args()
    if args.table:
        print(table(RESULTS / f"{args.name}.json"))
        return
    torch.set_num_threads(1)
    started = time.perf_counter()
    results: dict[str, Any] = {"encode": [encode_times(n, args.reps) for n in args.lengths]}
    print(json.dumps(results["encode"]), flush=True)
    with tempfile.TemporaryDirectory() as work:
        data, registry, version = train_model(Path(work))
        results["drift"] = drift(registry, version, data, args.drift_users)
        print(json.dumps(results["drift"]), flush=True)
        long = long_registry(Path(work) / "long")
        results["serving"] = serving((registry, version), long, args.requests, args.rounds)
    config = {
        "model": MODEL,
        "torch_threads": 1,
        "reps": args.reps,
        "serving": {
            "clients": 16,
            "users": 64,
            "requests": args.requests,
            "requests_at_L1000": args.requests // 4,
            "rounds": args.rounds,
        },
    }
    path = write_result(args.name, config, results, started)
    plot(results, RESULTS / f"{args.name}.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
