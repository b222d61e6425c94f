"""Where a computed recommendation's time goes in `recloop serve` (Beauty, exact index).

Two parts, both on the model bench/serve.py trains (runs/bench-serve/beauty):

- components: the pieces of a batch on the compute thread (history lookup, engine encode,
  exclusion lists, scoring GEMM, top-k, the whole batched top-k) and the JSON body, over
  real users' histories at batch sizes 1, 16 and 32. Alternatives are timed call by call in
  alternation (numpy vs torch GEMM, one np.unique per batch vs per row), so that a machine
  whose speed changes from second to second affects both alike; medians are reported.
- server: the real app under uvicorn (uvloop, httptools, no result cache) driven by wrk with
  bench/serve.py's user mix: per request, the time of the batcher's two threads (first stage:
  encode; second stage: search + JSON; engine and index within them) and how busy each was,
  and the event loop's own time by function (cProfile, main thread only; the profiler slows
  the loop, so compare its rows with each other).

Writes bench/results/NAME.json (default serve-profile).

    .venv/bin/python bench/serve_profile.py --name serve-profile-20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result
from bench.serve import WORK, WRK_SCRIPT, beauty_model, known_users

BATCHES = (1, 16, 32)


def _alternating(functions: dict[str, Callable[[], object]], calls: int) -> dict[str, float]:
    """Median microseconds per call of each function, timed one call of each in turn."""
    times: dict[str, list[int]] = {name: [] for name in functions}
    for _ in range(calls):
        for name, function in functions.items():
            started = time.perf_counter_ns()
            function()
            times[name].append(time.perf_counter_ns() - started)
    return {name: round(float(np.median(values)) / 1000, 1) for name, values in times.items()}


def _per_row_unique(exclude: list[np.ndarray], num_items: int) -> list[np.ndarray]:
    """The exclusion lists as the index built them before issue 20: one np.unique per row."""
    return [np.unique(row[(row >= 1) & (row <= num_items)]) for row in exclude]


def components(bundle: Any, users: list[str], calls: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for batch in BATCHES:
        picked = [users[i] for i in rng.choice(len(users), batch)]
        out[f"batch_{batch}"] = {**_batch_pieces(bundle, picked, calls), "rows": batch}
    return out


def _batch_pieces(bundle: Any, picked: list[str], calls: int) -> dict[str, float]:
    from recloop.serve.bundle import TopK
    from recloop.serve.indexes.base import normalise_exclude
    from recloop.serve.recommender import items_json, recommendations_body

    index, engine = bundle.index, bundle.engine
    table = index._floats.view()[1:]  # the exact index's float32 rows, as it scores them
    torch_table = torch.from_numpy(table)
    sequences = [bundle.user_history(user) for user in picked]
    queries = np.array(engine.encode(sequences))
    torch_queries = torch.from_numpy(queries)
    scores = torch.from_numpy(queries @ table.T)
    requests = [TopK(sequence, 10, sequence) for sequence in sequences]
    results = bundle.top_items(requests)
    batch, num_items = len(picked), index.num_items
    return _alternating(
        {
            "history_lookup_all_rows": lambda: [bundle.user_history(u) for u in picked],
            "engine_encode": lambda: engine.encode(sequences),
            "index_search_with_exclusions": lambda: index.search(queries, 10, sequences),
            "exclusions_one_unique_per_batch": lambda: normalise_exclude(
                sequences, batch, num_items
            ),
            "exclusions_one_unique_per_row_before": lambda: _per_row_unique(sequences, num_items),
            "gemm_numpy": lambda: queries @ table.T,
            "gemm_torch_before": lambda: (torch_queries @ torch_table.T).numpy(),
            "topk_torch": lambda: torch.topk(scores, 10, dim=1),
            "top_items_whole_batch": lambda: bundle.top_items(requests),
            "json_bodies_all_rows": lambda: [
                recommendations_body(bundle, u, items_json(bundle, ids, s), None, [])
                for u, (ids, s) in zip(picked, results, strict=True)
            ],
        },
        calls,
    )


def server(registry: Path, users: list[str], duration: int, port: int) -> dict[str, Any]:
    """The app under wrk, instrumented (see the module docstring)."""
    import uvicorn

    from recloop.serve import batcher as batcher_module
    from recloop.serve.app import create_app
    from recloop.serve.bundle import LoadOptions
    from recloop.serve.service import ServiceConfig

    config = ServiceConfig(
        registry=registry,
        load=LoadOptions(index="exact", max_batch=32, cache_dir=WORK / "onnx-cache"),
        cache=False,
    )
    app = create_app(config)
    bundle = app.service.holder.current
    assert bundle is not None
    spent: dict[str, list[int]] = {
        "batch": [], "second": [], "encode": [], "search": [], "size": []
    }  # fmt: skip

    def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter_ns()
            result = function(*args, **kwargs)
            spent[name].append(time.perf_counter_ns() - started)
            return result

        return wrapper

    bundle.engine.encode = timed("encode", bundle.engine.encode)  # type: ignore[method-assign]
    bundle.index.search = timed("search", bundle.index.search)  # type: ignore[method-assign]
    compute = batcher_module._compute

    def batch_compute(group: list[Any]) -> Any:
        spent["size"].append(len(group))
        return timed("batch", compute)(group)

    batcher_module._compute = batch_compute
    # The second stage (search + JSON) runs on its own thread since issue 20: timed apart.
    batcher_module._finish = timed("second", batcher_module._finish)
    script = WORK / "profile-wrk.lua"
    script.write_text(
        WRK_SCRIPT.replace("{USERS}", "{" + ",".join(json.dumps(u) for u in users) + "}")
    )
    profiler = cProfile.Profile()
    loop: list[asyncio.AbstractEventLoop] = []
    report: dict[str, Any] = {}

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if not loop:
            loop.append(asyncio.get_running_loop())
        await app(scope, receive, send)

    def wrk(seconds: int) -> dict[str, Any]:
        text = subprocess.run(
            [
                "wrk",
                "-t1",
                "-c32",
                f"-d{seconds}s",
                "--timeout",
                "5s",
                "-s",
                str(script),
                f"http://127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        line = next(line for line in text.splitlines() if line.startswith("WRK_JSON "))
        result: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
        return result

    def drive() -> None:
        while not loop:
            time.sleep(0.2)
            with contextlib.suppress(subprocess.CalledProcessError):
                wrk(1)  # the first request tells which loop to profile
        wrk(2)  # warm-up
        for values in spent.values():
            values.clear()
        loop[0].call_soon_threadsafe(profiler.enable)
        report["wrk"] = wrk(duration)
        loop[0].call_soon_threadsafe(profiler.disable)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=drive, daemon=True).start()
    uvicorn.run(asgi, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools", ws="none")  # fmt: skip
    raw = report["wrk"]
    requests = int(raw["requests"])

    def per_request(name: str) -> float:
        return round(sum(spent[name]) / 1000 / float(requests), 1)

    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    ranked = sorted(stats.items(), key=lambda item: -item[1][2])[:25]
    return {
        "requests_per_s_under_profiler": round(requests / (raw["duration_us"] / 1e6), 1),
        "p99_ms": raw["p99_us"] / 1000,
        "mean_batch_size": round(float(np.mean(spent["size"])), 2) if spent["size"] else None,
        "compute_thread_us_per_request": {
            "first_stage_encode_thread": per_request("batch"),
            "second_stage_search_thread": per_request("second"),
            "engine_encode": per_request("encode"),
            "index_search": per_request("search"),
        },
        "encode_thread_busy_fraction": round(sum(spent["batch"]) / 1e9 / duration, 3),
        "search_thread_busy_fraction": round(sum(spent["second"]) / 1e9 / duration, 3),
        "event_loop_us_per_request": round(
            sum(value[2] for value in stats.values()) * 1e6 / requests, 1
        ),
        "event_loop_top_functions_us_per_request": {
            f"{Path(key[0]).name}:{key[1]}:{key[2]}": round(value[2] * 1e6 / requests, 2)
            for key, value in ranked
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="serve-profile")
    parser.add_argument("--calls", type=int, default=150, help="alternated calls per piece")
    parser.add_argument("--duration", type=int, default=8, help="seconds of wrk (server part)")
    parser.add_argument("--port", type=int, default=18089)
    parser.add_argument("--no-server", action="store_true", help="components only")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as `recloop serve --threads 1` computes
    from recloop.registry import Registry
    from recloop.serve.bundle import LoadOptions, load_bundle

    started = time.perf_counter()
    log = WORK / "profile.log"
    WORK.mkdir(parents=True, exist_ok=True)
    data, registry = beauty_model(log, retrain=False)
    users = known_users(data)
    options = LoadOptions(index="exact", max_batch=32, cache_dir=WORK / "onnx-cache")
    bundle = load_bundle(Registry(registry), "latest", options)
    results: dict[str, Any] = {
        "load_average_before": os.getloadavg()[0],
        "components_median_us": components(bundle, users, args.calls),
    }
    if not args.no_server:
        results["server"] = server(registry, users, args.duration, args.port)
    results["load_average_after"] = os.getloadavg()[0]
    config = {"calls": args.calls, "wrk": "-t1 -c32", "duration_s": args.duration, "k": 10}
    print(f"wrote {write_result(args.name, config, results, started)}")


if __name__ == "__main__":
    main()
