"""`recloop demo`: the whole loop on synthetic data, each stage printed as it runs.

1. prepare  2. train  3. registry  4. serve  5. online  6. compress: the same calls the stage
commands make, in one process, with the HTTP service on a thread and this process as its client.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from recloop.cli.common import stdout
from recloop.cli.data import prepare_synthetic, stats, synthetic_config
from recloop.cli.models import models_list

if TYPE_CHECKING:
    import httpx

    from recloop.data.dataset import SequenceDataset
    from recloop.data.splits import Split
    from recloop.data.synthetic import SyntheticConfig


def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its files.")] = Path(
        "demo-run"
    ),
    users: Annotated[int, typer.Option(help="Synthetic users.")] = 5_000,
    items: Annotated[int, typer.Option(help="Synthetic items.")] = 2_000,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 4,
) -> None:
    """The whole loop on the embedded default (synthetic data); later stages join as they land."""
    from recloop.data.threads import configure_threads

    configure_threads(None)  # before polars is imported: it sizes its pool once
    import shutil

    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("registry", "online"):  # a re-run tells the same story from version 1
        shutil.rmtree(workdir / stale, ignore_errors=True)
    data_dir = workdir / "data"
    stdout.rule("1. prepare: synthetic interaction log -> dataset")
    dataset, popularity = _prepare(data_dir, users, items)

    stdout.rule("2. train: SASRec, full-softmax on every prefix -> registry version")
    registry = workdir / "registry"
    version = _train(data_dir, registry, workdir / "run", epochs, popularity)

    stdout.rule("3. registry: every trained model is a checksummed version")
    models_list(registry)

    stdout.rule("4. serve: HTTP service (ONNX Runtime, micro-batching, exact top-K)")
    shifted = synthetic_config(None, users=users, items=items, seed=1)
    _serve(registry, dataset, workdir, shifted)

    stdout.rule("6. compress: int8 version of the trained model, loaded as serving loads it")
    _compress(registry, data_dir, version)


def _prepare(data_dir: Path, users: int, items: int) -> tuple[SequenceDataset, float]:
    """The synthetic dataset, its split, and the popularity baseline a model must beat."""
    from recloop.data.dataset import SequenceDataset
    from recloop.data.prepare import PrepareOptions
    from recloop.data.splits import leave_one_out

    config = synthetic_config(None, users=users, items=items, seed=0)
    prepare_synthetic(config, data_dir, PrepareOptions(), True, None)
    stats(data_dir, json_output=False)
    dataset = SequenceDataset(data_dir, verify=True)
    split = leave_one_out(dataset.sequences)
    stdout.print(
        f"leave-one-out split: {split.train.num_events:,} training events, "
        f"{len(split.valid):,} validation and {len(split.test):,} test users",
        highlight=False,
    )
    popularity = _popularity_hr10(split)
    stdout.print(
        f"popularity baseline on validation: HR@10 = {popularity:.4f} "
        "(the number a sequential model must beat)",
        highlight=False,
    )
    return dataset, popularity


def _popularity_hr10(split: Split) -> float:
    import numpy as np

    counts = np.bincount(np.asarray(split.train.items))
    counts[0] = 0
    top = np.argsort(-counts, kind="stable")[:10]
    hits = np.isin(split.valid.targets, top)
    return float(hits.mean()) if len(hits) else math.nan


def _train(data_dir: Path, registry: Path, run_dir: Path, epochs: int, popularity: float) -> str:
    """A small SASRec, published as the registry's first version (its id is returned)."""
    from recloop.config import config_from_dict
    from recloop.train.trainer import describe_metrics, train

    experiment = config_from_dict(
        {
            "model": {"type": "sasrec", "dim": 32, "num_blocks": 1, "dropout": 0.2},
            "train": {"batch_size": 128, "lr": 3e-3, "max_epochs": epochs, "warmup_steps": 20},
        },
        source="recloop demo",
    )
    result = train(experiment, data_dir, run_dir, registry_dir=registry, command="recloop demo")
    keys = ("HR@10", "NDCG@10", "MRR")
    stdout.print(
        f"{result.steps} steps at {result.tokens_per_second:,.0f} tokens/s; published "
        f"{result.version}\nvalid: {describe_metrics(result.best_metrics, keys)}\n"
        f"test:  {describe_metrics(result.test_metrics, keys)} "
        f"(popularity HR@10 {popularity:.4f})",
        highlight=False,
    )
    stdout.print(f"curves: {run_dir / 'curves.png'}", highlight=False)
    return str(result.version)


def _serve(
    registry: Path, dataset: SequenceDataset, workdir: Path, shifted: SyntheticConfig
) -> None:
    """Starts the real service in a thread and uses it as a client would; then the online
    loop: events through the API into the durable log, the learner, and the hot swap."""
    import secrets

    import httpx

    from recloop.serve.server import serve_in_thread
    from recloop.serve.service import ServiceConfig

    key = secrets.token_hex(16)
    events_path = workdir / "events.sqlite"
    events_path.unlink(missing_ok=True)
    config = ServiceConfig(
        registry=registry, api_key=key, event_log=str(events_path), follow_seconds=0.5
    )
    with serve_in_thread(config) as url, httpx.Client(base_url=url, timeout=30) as http:
        model = http.get("/v1/model").json()
        stdout.print(
            f"serving {model['version']} at {url}: engine {model['engine']}, index "
            f"{model['index']}, loaded in {model['loaded_in_seconds']} s (docs at {url}/docs)",
            highlight=False,
        )
        _recommend(http, key, str(dataset.users.to_raw([0])[0]))
        _time_requests(http, dataset)
        stdout.rule("5. online: events -> log -> learner -> delta version -> hot swap")
        events = _shifted_events(shifted)
        _learn_online(http, key, registry, events, events_path, workdir / "online")


def _recommend(http: httpx.Client, key: str, user: str) -> None:
    """A known user's recommendations (cached the second time, fresh after an event), an
    anonymous sequence's, and an unknown user's fallback."""

    def show(title: str) -> list[str]:
        body = http.get(f"/v1/users/{user}/recommendations", params={"k": 5}).json()
        items = [item["item_id"] for item in body["items"]]
        stdout.print(f"{title}: {', '.join(items)}  (cached={body['cached']})", highlight=False)
        return items

    first = show(f"GET /v1/users/{user}/recommendations?k=5")
    show("same request again")
    event = {"events": [{"user_id": user, "item_id": first[0]}]}
    http.post("/v1/events", json=event, headers={"X-API-Key": key}).raise_for_status()
    stdout.print(f"POST /v1/events: user {user} interacted with item {first[0]}")
    show("recommendations right after the event")
    anonymous = http.post("/v1/recommendations", json={"items": first[:3], "k": 5}).json()
    stdout.print(
        "POST /v1/recommendations (anonymous sequence): "
        + ", ".join(item["item_id"] for item in anonymous["items"]),
        highlight=False,
    )
    unknown = http.get("/v1/users/someone-new/recommendations", params={"k": 5}).json()
    stdout.print(f"unknown user: fallback={unknown['fallback']}", highlight=False)


def _time_requests(http: httpx.Client, dataset: SequenceDataset) -> None:
    import statistics
    import time

    timings = []
    for i in range(200):
        started = time.perf_counter()
        http.get(f"/v1/users/{dataset.users.to_raw([i % dataset.num_users])[0]}/recommendations")
        timings.append((time.perf_counter() - started) * 1000)
    stdout.print(
        f"200 sequential requests from this process: median {statistics.median(timings):.2f} "
        "ms each (a demo, not a benchmark: see bench/serve.py)",
        highlight=False,
    )


def _shifted_events(shifted: SyntheticConfig) -> list[dict[str, Any]]:
    """A shifted stream: the generator with another seed has other item-to-item successors,
    which the trained model has never seen; the online learner has to pick them up. Three new
    users then meet a brand-new item right after a known one."""
    import polars as pl

    from recloop.data.synthetic import generate_events

    frame = pl.concat(list(generate_events(shifted)))
    frame = frame.filter(pl.col("user") < 1000).sort("timestamp")
    events: list[dict[str, Any]] = [
        {"user_id": str(u), "item_id": str(i), "timestamp": float(t)}
        for u, i, t in frame.select("user", "item", "timestamp").iter_rows()
    ]
    popular = events[0]["item_id"]
    for n in range(3):
        user = f"new-user-{n}"
        events += [{"user_id": user, "item_id": popular}, {"user_id": user, "item_id": "new-1"}]
    return events


def _learn_online(
    http: httpx.Client,
    key: str,
    registry: Path,
    events: list[dict[str, Any]],
    events_path: Path,
    run_dir: Path,
) -> None:
    """The events through the API into the log, the learner's deltas, the service's swap."""
    from recloop.events import open_event_log
    from recloop.online.config import OnlineConfig
    from recloop.online.learner import OnlineLearner
    from recloop.online.prequential import describe
    from recloop.registry import Registry

    for start in range(0, len(events), 1000):
        batch = {"events": events[start : start + 1000]}
        http.post("/v1/events", json=batch, headers={"X-API-Key": key}).raise_for_status()
    stdout.print(f"POST /v1/events: {len(events):,} events appended durably to {events_path}")
    config = OnlineConfig(publish_every_events=10_000, publish_every_seconds=0)
    with open_event_log(str(events_path)) as log:
        learner = OnlineLearner(Registry(registry), log, config, run_dir)
        summary = learner.run(show_progress=True)
    totals = summary.totals
    stdout.print(
        f"learned {summary.events:,} events in {summary.seconds:.1f}s; published "
        f"{', '.join(summary.published)} (deltas); {summary.admitted} new item admitted\n"
        f"prequential HR@10 (each event scored before it is learned): "
        f"{describe(totals)} "
        f"(plot: {run_dir / 'prequential.png'})",
        highlight=False,
    )
    _wait_for_swap(http, summary.version)


def _wait_for_swap(http: httpx.Client, version: str) -> None:
    """The service follows the registry: wait until it serves `version`, then ask it about
    the new item."""
    import time

    deadline = time.monotonic() + 120
    model = http.get("/v1/model").json()
    while model["version"] != version and time.monotonic() < deadline:
        time.sleep(0.25)
        model = http.get("/v1/model").json()
    stdout.print(f"the service (following the registry) now serves {model['version']}")
    similar = http.get("/v1/items/new-1/similar", params={"k": 5})
    if similar.status_code == 200:
        items = ", ".join(item["item_id"] for item in similar.json()["items"])
        stdout.print(f"GET /v1/items/new-1/similar?k=5 (the new item is served): {items}")
    else:
        stdout.print(f"GET /v1/items/new-1/similar: {similar.status_code} {similar.text}")


def _compress(registry: Path, data_dir: Path, version: str) -> None:
    from recloop.compress.pipeline import CompressOptions, compress_version
    from recloop.registry import Registry
    from recloop.serve.bundle import LoadOptions, load_bundle

    store = Registry(registry)
    options = CompressOptions("int8", data=data_dir, show_progress=False, command="recloop demo")
    result = compress_version(store, version, options)
    metrics = result.metrics
    stdout.print(
        f"int8 of {version} published as {result.version}: weights "
        f"{metrics['compression/size_ratio']:.0%} of fp32; test NDCG@10 "
        f"{metrics['test/NDCG@10']:.4f} ({metrics['compression/relative_test_NDCG@10']:.1%} of "
        f"fp32); top-10 overlap with fp32 {metrics['parity/top10_overlap']:.3f}",
        highlight=False,
    )
    # What `recloop serve --version` does: export, parity check against torch, index.
    bundle = load_bundle(store, result.version, LoadOptions())
    try:
        engine = bundle.describe()["engine"]
        stdout.print(
            f"{result.version} loads for serving: {engine} engine, parity checked; "
            f"also: recloop compress --method prune-structured|distill, recloop export",
            highlight=False,
        )
    finally:
        bundle.close()


def register(app: typer.Typer) -> None:
    app.command()(demo)
