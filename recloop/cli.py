"""The `recloop` command: one sub-command per stage of the loop.

Heavy libraries (polars, torch) are imported inside commands, after `--threads` has been
applied, because polars fixes its thread pool size when it is imported.
"""

from __future__ import annotations

import json
import math
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from recloop.compress.cli import register as register_compress_commands
from recloop.errors import ConfigError, RecloopError, undecodable

app = typer.Typer(
    name="recloop",
    help="Large sequential recommenders: prepare data, train, serve, learn online.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)

FORMAT_HELP = (
    "movielens-dat (UserID::MovieID::Rating::Timestamp), ml100k (u.data, tab-separated), "
    "movielens-csv (ratings.csv), sasrec ('user item' per line, file order = time), "
    "s3rec ('user item1 item2 ...' per line), csv, parquet (columns set by --*-col), "
    "synthetic (the built-in generator; --input is an optional TOML/JSON generator config)"
)


def main() -> None:
    """Console entry point: domain errors become one clear line and exit status 2."""
    try:
        app()
    except RecloopError as exc:
        # One line, printed as is: a message quoting a file's text may hold "[...]" (rich
        # markup) or line breaks (some library messages).
        message = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
        sys.exit(2)


@app.command()
def prepare(
    format: Annotated[str, typer.Option("--format", "-f", help=FORMAT_HELP)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset directory to create.")],
    input: Annotated[
        Path | None, typer.Option("--input", "-i", help="Input log (or synthetic config).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    threads: Annotated[
        int | None, typer.Option(help="Preprocessing threads (default: all cores).")
    ] = None,
    duplicates: Annotated[
        str, typer.Option(help="Exact duplicates: drop, keep or error.")
    ] = "drop",
    min_user_events: Annotated[int, typer.Option(help="Drop users with fewer events.")] = 2,
    user_core: Annotated[int, typer.Option(help="k-core: min events per user.")] = 0,
    item_core: Annotated[int, typer.Option(help="k-core: min events per item.")] = 0,
    user_col: Annotated[str, typer.Option(help="csv/parquet: user column.")] = "user_id",
    item_col: Annotated[str, typer.Option(help="csv/parquet: item column.")] = "item_id",
    time_col: Annotated[
        str, typer.Option(help="csv/parquet: timestamp column ('none': file order).")
    ] = "timestamp",
    value_col: Annotated[str | None, typer.Option(help="csv/parquet: value column.")] = None,
    event_col: Annotated[str | None, typer.Option(help="csv/parquet: event-type column.")] = None,
    separator: Annotated[str, typer.Option(help="csv: field separator.")] = ",",
    users: Annotated[int | None, typer.Option(help="synthetic: number of users.")] = None,
    items: Annotated[int | None, typer.Option(help="synthetic: number of items.")] = None,
    seed: Annotated[int | None, typer.Option(help="synthetic: random seed.")] = None,
    item_attributes: Annotated[
        Path | None,
        typer.Option(help="JSON item -> attribute list (S3-Rec item2attributes.json layout)."),
    ] = None,
) -> None:
    """Read an interaction log and write a recloop dataset directory (CSR + vocab + manifest)."""
    from recloop.data.threads import configure_threads

    pool = configure_threads(threads)
    from recloop.data.prepare import FileSource, PrepareOptions, prepare_file
    from recloop.data.readers import FORMATS, ColumnMap
    from recloop.progress import progress_bar

    if format not in FORMATS:
        raise ConfigError(f"--format {format!r} is not one of: {', '.join(FORMATS)}")
    options = PrepareOptions(
        duplicates=duplicates,  # type: ignore[arg-type]  # validated by PrepareOptions
        min_user_events=min_user_events,
        user_core=user_core,
        item_core=item_core,
    )

    def notice(message: str) -> None:
        stderr.print(f"[yellow]note:[/] {message}", highlight=False)

    if format == "synthetic":
        if item_attributes is not None:
            raise ConfigError("--item-attributes applies to a log file, not --format synthetic")
        config = _synthetic_config(input, users=users, items=items, seed=seed)
        manifest = _prepare_synthetic(config, out, options, overwrite, notice)
    else:
        if input is None:
            raise ConfigError(f"--input is required for --format {format}")
        columns = None
        if format in ("csv", "parquet"):
            columns = ColumnMap(
                user=user_col,
                item=item_col,
                timestamp=None if time_col.lower() == "none" else time_col,
                value=value_col,
                event=event_col,
                separator=separator,
            )
        source = FileSource(input, format, columns)
        if format == "parquet" and input.is_file():
            from recloop.data.readers import parquet_rows

            total, unit = float(parquet_rows(input)), "rows"
        else:
            total, unit = float(input.stat().st_size) if input.is_file() else 0.0, "bytes"
        with progress_bar(f"reading {input.name}", total, unit) as advance:
            manifest = prepare_file(
                source,
                out,
                options,
                overwrite=overwrite,
                on_progress=advance,
                notice=notice,
                item_attributes=item_attributes,
            )
    counts = manifest["counts"]
    stdout.print(
        f"wrote {out}: {counts['users']:,} users, {counts['items']:,} items, "
        f"{counts['events']:,} events in {manifest['prepare_seconds']:.2f} s "
        f"({pool} threads)",
        highlight=False,
    )
    if "item_attributes" in manifest:
        found = manifest["item_attributes"]
        stdout.print(
            f"item attributes: {found['attributes']:,} values, "
            f"{found['items_with_attributes']:,} of {counts['items']:,} items have some, "
            f"{found['unknown_items']:,} items of the file are not in the log",
            highlight=False,
        )


def _synthetic_config(
    path: Path | None, *, users: int | None, items: int | None, seed: int | None
) -> Any:
    from recloop.data.synthetic import SyntheticConfig

    values: dict[str, object] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"{path}: no such synthetic config file")
        try:
            text = path.read_text(encoding="utf-8")
            values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot parse synthetic config: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: {undecodable(exc)}; a config file is UTF-8 text") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the synthetic config ({exc.strerror})") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a synthetic config is a table (TOML) or object (JSON)")
    for key, value in (("num_users", users), ("num_items", items), ("seed", seed)):
        if value is not None:
            values[key] = value
    num_items = values.get("num_items")
    if isinstance(num_items, int) and "num_topics" not in values:
        # Small catalogues get fewer topics, so each topic keeps several items.
        topics = max(1, min(SyntheticConfig.num_topics, num_items // 8))
        values["num_topics"] = topics
        values.setdefault("topics_per_user", min(SyntheticConfig.topics_per_user, topics))
    return SyntheticConfig.from_dict(values)


def _prepare_synthetic(
    config: Any, out: Path, options: Any, overwrite: bool, notice: Any
) -> dict[str, Any]:
    from dataclasses import asdict

    from recloop.data.prepare import prepare, with_source_order
    from recloop.data.synthetic import generate_events
    from recloop.progress import progress_bar

    chunk_users = 100_000
    with progress_bar("generating synthetic users", config.num_users, "users") as advance:

        def chunks() -> Any:
            for chunk in generate_events(config, chunk_users=chunk_users):
                advance(min(chunk_users, chunk["user"].n_unique()))
                yield chunk

        source = {"kind": "synthetic", "format": "synthetic", "config": asdict(config)}
        return prepare(
            with_source_order(chunks()), source, out, options, overwrite=overwrite, notice=notice
        )


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write.")],
    users: Annotated[int, typer.Option(help="Number of users.")] = 10_000,
    items: Annotated[int, typer.Option(help="Number of items.")] = 5_000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    config: Annotated[Path | None, typer.Option(help="TOML/JSON generator config.")] = None,
) -> None:
    """Write a synthetic interaction log as Parquet (columns user, item, timestamp)."""
    from recloop.data.synthetic import generate_log

    synthetic = _synthetic_config(config, users=users, items=items, seed=seed)
    rows = generate_log(synthetic, out)
    stdout.print(f"wrote {out}: {rows:,} events", highlight=False)


@app.command()
def stats(
    directory: Annotated[Path, typer.Argument(help="A dataset directory.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Summarise a prepared dataset: users, items, events, lengths, popularity."""
    from recloop.data.dataset import SequenceDataset

    summary = SequenceDataset(directory).stats()
    if json_output:
        print(json.dumps(summary, indent=2))
        return
    table = Table(title=f"dataset {directory}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    lengths = summary["sequence_length"]
    rows = [
        ("source", str(summary["source"])),
        ("users", f"{summary['users']:,}"),
        ("items", f"{summary['items']:,}"),
        ("events", f"{summary['events']:,}"),
        ("density", f"{summary['density']:.3e}"),
        ("time", summary["time"]),
        (
            "sequence length",
            f"min {lengths['min']}, median {lengths['median']:g}, "
            f"mean {lengths['mean']:.2f}, max {lengths['max']}",
        ),
        ("top 10% items' share", f"{summary['item_popularity']['top10pct_share']:.1%}"),
        ("dropped", ", ".join(f"{k} {v:,}" for k, v in summary["dropped"].items())),
    ]
    for key, value in rows:
        table.add_row(key, value)
    stdout.print(table)


@app.command("train")
def train_command(
    data: Annotated[Path, typer.Option("--data", help="Dataset directory (recloop prepare).")],
    registry: Annotated[Path, typer.Option("--registry", help="Model registry directory.")],
    config: Annotated[Path | None, typer.Option("--config", help="Experiment TOML.")] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="section.key=value overrides, e.g. train.lr=3e-3")
    ] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Wall-clock training budget.")] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Checkpoints, metrics.csv, curves.png (default runs/...).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --run-dir exactly.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if any).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads.")] = None,
) -> None:
    """Train a model, keep the best validation checkpoint, publish it to the registry."""
    import time as _time

    import torch

    from recloop.config import load_config
    from recloop.train.trainer import describe_metrics, train, validation_metric_prefix

    if threads is not None:
        torch.set_num_threads(threads)
    extra = list(overrides or [])
    if max_minutes is not None:
        extra.append(f"train.max_minutes={max_minutes}")
    experiment = load_config(config, extra)
    if resume and run_dir is None:
        raise ConfigError("--resume needs --run-dir (the run to continue)")
    if run_dir is None:
        stamp = _time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{stamp}-{experiment.model['type']}"
    result = train(
        experiment,
        data,
        run_dir,
        registry_dir=registry,
        resume=resume,
        device=device,
        command="recloop " + " ".join(sys.argv[1:]),
    )
    if result.version is None:
        return  # a non-zero rank under torchrun: rank 0 reports
    keys = ("HR@10", "NDCG@10", "HR@20", "NDCG@20", "MRR")
    stdout.print(
        f"trained {result.steps} steps ({result.epochs:.1f} epochs, "
        f"{result.tokens_per_second:,.0f} tokens/s, stopped by {result.stopped_by}); "
        f"best step {result.best_step}",
        highlight=False,
    )
    prefix = validation_metric_prefix(experiment.train)  # "sampled100/" names its protocol
    valid_keys = tuple(prefix + key for key in keys)
    stdout.print(f"valid: {describe_metrics(result.best_metrics, valid_keys)}", highlight=False)
    stdout.print(f"test:  {describe_metrics(result.test_metrics, keys)}", highlight=False)
    stdout.print(f"run directory: {result.run_dir}", highlight=False)
    print(result.version)


@app.command("eval")
def eval_command(
    registry: Annotated[Path, typer.Option("--registry", help="Model registry directory.")],
    data: Annotated[Path, typer.Option("--data", help="Dataset directory.")],
    version: Annotated[str, typer.Option(help="Version id, latest or production.")] = "latest",
    protocol: Annotated[str, typer.Option(help="full or sampled100.")] = "full",
    split: Annotated[str, typer.Option(help="test or valid.")] = "test",
    max_users: Annotated[
        int | None, typer.Option(help="Evaluate a random subset of users (sampled100).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for negatives / user subset.")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Evaluate a registry version on a dataset's leave-one-out split."""
    from recloop.data.dataset import SequenceDataset
    from recloop.evaluate import EvalConfig, evaluate
    from recloop.registry import Registry
    from recloop.registry.loading import check_vocabulary, load_model

    if protocol not in ("full", "sampled100"):
        raise ConfigError(f"--protocol must be full or sampled100, got {protocol!r}")
    if split not in ("test", "valid"):
        raise ConfigError(f"--split must be test or valid, got {split!r}")
    dataset = SequenceDataset(data)
    store = Registry(registry, create=False)
    resolved = store.resolve(version)
    check_vocabulary(store, resolved, dataset.manifest["files"]["items.parquet"]["sha256"])
    model, manifest = load_model(store, resolved)
    examples = getattr(dataset.leave_one_out(), split)
    config = EvalConfig(
        max_length=int(manifest.model.get("max_length", 50)),
        protocol=protocol,  # type: ignore[arg-type]
        max_users=max_users,
        seed=seed,
    )
    metrics = evaluate(model, examples, dataset.sequences, config)
    result = {"version": resolved, "data": str(data), "split": split, **metrics}
    if json_output:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"{resolved} on {data} ({split}, {protocol})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    stdout.print(table)


@app.command("serve")
def serve_command(
    registry: Annotated[Path, typer.Option("--registry", help="Model registry directory.")],
    version: Annotated[
        str, typer.Option(help="Version to serve: id, latest, production or auto.")
    ] = "auto",
    host: Annotated[str, typer.Option(help="Bind address (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    redis_url: Annotated[
        str | None,
        typer.Option(help="redis://... for shared state and cache (default: in-process)."),
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Dataset for users' history (default: the version's).")
    ] = None,
    engine: Annotated[str, typer.Option(help="onnx, torch or torch-compiled.")] = "onnx",
    index: Annotated[str, typer.Option(help="exact, exact-int8 or ivf.")] = "exact",
    shards: Annotated[int, typer.Option(help="Item index shards.")] = 1,
    remote_shards: Annotated[bool, typer.Option(help="Run each shard in its own process.")] = False,
    min_recall: Annotated[float, typer.Option(help="ivf: recall@10 vs exact to reach.")] = 0.95,
    max_batch: Annotated[int, typer.Option(help="Requests per micro-batch (1 = off).")] = 32,
    max_wait_us: Annotated[int, typer.Option(help="Wait for more requests (microseconds).")] = 500,
    max_queue: Annotated[int, typer.Option(help="Queued requests before 503.")] = 1024,
    cache: Annotated[bool, typer.Option(help="Result cache per user.")] = True,
    cache_ttl: Annotated[float, typer.Option(help="Result cache TTL (seconds).")] = 60.0,
    state_snapshot: Annotated[
        Path | None, typer.Option(help="In-process state: snapshot file (load/save).")
    ] = None,
    follow: Annotated[
        float | None, typer.Option(help="Poll the registry every N s and hot-swap.")
    ] = None,
    threads: Annotated[int, typer.Option(help="Inference threads.")] = 1,
    device: Annotated[str, typer.Option(help="cpu or cuda (torch engines).")] = "cpu",
    cache_dir: Annotated[
        Path | None, typer.Option(help="Keep exported ONNX files here between starts.")
    ] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body.")] = 1 << 20,
    event_log: Annotated[
        str | None,
        typer.Option(help="Durable log of POST /v1/events: a path (SQLite) or redis://..."),
    ] = None,
    snapshot_every: Annotated[
        float, typer.Option(help="In-process state: write the snapshot every N s (if changed).")
    ] = 30.0,
    protect: Annotated[
        str,
        typer.Option(help="Read-only endpoints that need the API key too: docs,metrics,model."),
    ] = "",
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
) -> None:
    """Serve recommendations over HTTP (API key for writes: env RECLOOP_API_KEY)."""
    import logging
    import os

    # Before numpy/faiss/torch load: their BLAS and OpenMP pools default to one thread per
    # core and spin while idle, which on 2 cores takes a whole core from the event loop. The
    # service computes on one inference thread (--threads), so the pools get that many.
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(threads))
    from recloop.serve.app import ServiceConfig
    from recloop.serve.runtime import LoadOptions
    from recloop.serve.server import run_server

    if engine not in ("onnx", "torch", "torch-compiled"):
        raise ConfigError(f"--engine must be onnx, torch or torch-compiled, got {engine!r}")
    if index not in ("exact", "exact-int8", "ivf"):
        raise ConfigError(f"--index must be exact, exact-int8 or ivf, got {index!r}")
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    if follow is not None and follow <= 0:
        raise ConfigError(f"--follow must be > 0 seconds, got {follow}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ServiceConfig(
        registry=registry,
        ref=version,
        load=LoadOptions(
            engine=engine,  # type: ignore[arg-type]
            index=index,  # type: ignore[arg-type]
            shards=shards,
            remote_shards=remote_shards,
            max_batch=max(max_batch, 1),
            threads=threads,
            device=device,
            min_recall=min_recall,
            data=data,
            cache_dir=cache_dir,
        ),
        state_url=redis_url,
        state_snapshot=state_snapshot,
        cache=cache,
        cache_ttl=cache_ttl,
        max_batch=max_batch,
        max_wait_us=max_wait_us,
        max_queue=max_queue,
        api_key=os.environ.get("RECLOOP_API_KEY") or None,
        max_body_bytes=max_body_bytes,
        follow_seconds=follow,
        event_log=event_log,
        snapshot_seconds=snapshot_every,
        protected=frozenset(name.strip() for name in protect.split(",") if name.strip()),
    )

    def announce(version: str) -> None:
        stderr.print(f"recloop serve: {version} at http://{host}:{port} (API docs at /docs)")

    # The version is loaded (and verified) before the port is bound: a broken one is an error.
    run_server(config, host=host, port=port, log_level=log_level, on_loaded=announce)


@app.command("ingest")
def ingest_command(
    file: Annotated[Path, typer.Argument(help="Events: JSON lines or CSV with a header.")],
    event_log: Annotated[
        str, typer.Option(help="The event log: a path (SQLite) or redis://...")
    ] = "events.sqlite",
    batch_size: Annotated[int, typer.Option(help="Events per durable append.")] = 10_000,
) -> None:
    """Append a file of events (user_id, item_id[, timestamp, event_type, value]) to the log."""
    from recloop.events import open_event_log, read_events_file

    if not file.is_file():
        raise ConfigError(f"{file}: no such events file")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    appended, first, last = 0, None, None
    with open_event_log(event_log) as log:
        # Batch by batch: a bad line stops the run with file:line, and the batches before it
        # stay appended (their ids were printed as they were made durable).
        for batch in read_events_file(file, batch_size=batch_size):
            ids = log.append(batch)
            appended += len(ids)
            first = first or ids[0]
            last = ids[-1]
            stderr.print(f"appended {appended:,} events (last id {last})", highlight=False)
        total = log.count()
    stdout.print(
        f"{appended:,} events from {file} appended to {event_log} (ids {first}..{last}); "
        f"the log holds {total:,}",
        highlight=False,
    )


@app.command("online")
def online_command(
    registry: Annotated[Path, typer.Option("--registry", help="Model registry directory.")],
    event_log: Annotated[
        str, typer.Option(help="The event log: a path (SQLite) or redis://...")
    ] = "events.sqlite",
    start: Annotated[
        str, typer.Option("--from", help="Version to fine-tune (resumes this learner's own).")
    ] = "latest",
    config: Annotated[Path | None, typer.Option(help="TOML file with an [online] section.")] = None,
    run_dir: Annotated[
        Path, typer.Option(help="Learner state, prequential.csv and its plot.")
    ] = Path("runs/online"),
    data: Annotated[
        Path | None, typer.Option(help="Dataset for history and replay (default: the model's).")
    ] = None,
    attributes: Annotated[
        Path | None, typer.Option(help="JSON item -> attribute list, to initialise new items.")
    ] = None,
    follow: Annotated[bool, typer.Option(help="Keep consuming new events until stopped.")] = False,
    max_events: Annotated[int | None, typer.Option(help="Stop after this many events.")] = None,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 1,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="online.key=value overrides.")
    ] = None,
) -> None:
    """Fine-tune the model on new events and publish delta versions (test-then-train)."""
    import logging

    import torch

    from recloop.events import open_event_log
    from recloop.online.learner import OnlineLearner, load_online_config
    from recloop.registry import Registry

    if max_events is not None and max_events < 1:
        raise ConfigError(f"--max-events must be >= 1, got {max_events}")
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = load_online_config(config, overrides or [])
    with open_event_log(event_log) as log:
        learner = OnlineLearner(
            Registry(registry, create=False),
            log,
            settings,
            run_dir,
            start=start,
            data=data,
            attributes=attributes,
        )
        stderr.print(
            f"learning from {event_log} after offset {learner.offset} on {learner.version}",
            highlight=False,
        )
        summary = learner.run(follow=follow, max_events=max_events, show_progress=True)
    totals = summary.totals
    stdout.print(
        f"{summary.events:,} events in {summary.seconds:.1f}s, offset {summary.offset}, "
        f"{len(summary.published)} version(s) published, newest {summary.version}; "
        f"{summary.admitted} new item(s); prequential HR@10 online "
        f"{totals['online_HR@10']:.4f} vs frozen {totals['frozen_HR@10']:.4f} "
        f"over {totals['scored']:,} events (plot: {run_dir / 'prequential.png'})",
        highlight=False,
    )


register_compress_commands(app)  # recloop compress, recloop export

models_app = typer.Typer(help="List, inspect, promote and roll back model versions.")
app.add_typer(models_app, name="models")
RegistryOption = Annotated[Path, typer.Option("--registry", help="Model registry directory.")]


@models_app.command("list")
def models_list(
    registry: RegistryOption,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """All versions, oldest first, with their key metrics; broken ones are marked so."""
    from recloop.registry import Registry, format_versions_table

    infos = Registry(registry, create=False).list()
    if json_output:
        print(json.dumps([info.to_json() for info in infos], indent=2))
        return
    stdout.print(format_versions_table(infos))


@models_app.command("show")
def models_show(
    registry: RegistryOption,
    version: Annotated[str, typer.Argument(help="Version id, latest or production.")] = "latest",
) -> None:
    """A version's manifest (checksums verified)."""
    from recloop.registry import Registry

    store = Registry(registry, create=False)
    resolved = store.resolve(version)
    store.verify(resolved)
    print(json.dumps(store.manifest(resolved).to_json(), indent=2))


@models_app.command("promote")
def models_promote(
    registry: RegistryOption,
    version: Annotated[str, typer.Argument(help="Version id or latest.")],
) -> None:
    """Make a version the production one (serving follows it)."""
    from recloop.registry import Registry

    stdout.print(f"production is now {Registry(registry, create=False).promote(version)}")


@models_app.command("rollback")
def models_rollback(registry: RegistryOption) -> None:
    """Return production to the previously promoted version."""
    from recloop.registry import Registry

    stdout.print(f"production rolled back to {Registry(registry, create=False).rollback()}")


@app.command()
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

    configure_threads(None)
    import shutil

    from recloop.data.dataset import SequenceDataset
    from recloop.data.prepare import PrepareOptions
    from recloop.data.splits import leave_one_out

    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("registry", "online"):  # a re-run tells the same story from version 1
        shutil.rmtree(workdir / stale, ignore_errors=True)
    data_dir = workdir / "data"
    stdout.rule("1. prepare: synthetic interaction log -> dataset")
    config = _synthetic_config(None, users=users, items=items, seed=0)
    _prepare_synthetic(config, data_dir, PrepareOptions(), True, None)
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

    stdout.rule("2. train: SASRec, full-softmax on every prefix -> registry version")
    from recloop.config import config_from_dict
    from recloop.train.trainer import describe_metrics, train

    experiment = config_from_dict(
        {
            "model": {"type": "sasrec", "dim": 32, "num_blocks": 1, "dropout": 0.2},
            "train": {"batch_size": 128, "lr": 3e-3, "max_epochs": epochs, "warmup_steps": 20},
        },
        source="recloop demo",
    )
    registry = workdir / "registry"
    result = train(
        experiment, data_dir, workdir / "run", registry_dir=registry, command="recloop demo"
    )
    keys = ("HR@10", "NDCG@10", "MRR")
    stdout.print(
        f"{result.steps} steps at {result.tokens_per_second:,.0f} tokens/s; published "
        f"{result.version}\nvalid: {describe_metrics(result.best_metrics, keys)}\n"
        f"test:  {describe_metrics(result.test_metrics, keys)} "
        f"(popularity HR@10 {popularity:.4f})",
        highlight=False,
    )
    stdout.print(f"curves: {workdir / 'run' / 'curves.png'}", highlight=False)

    stdout.rule("3. registry: every trained model is a checksummed version")
    models_list(registry)

    stdout.rule("4. serve: HTTP service (ONNX Runtime, micro-batching, exact top-K)")
    shifted = _synthetic_config(None, users=users, items=items, seed=1)
    _demo_serve(registry, dataset, workdir, shifted)

    stdout.rule("6. compress: int8 version of the trained model, loaded as serving loads it")
    _demo_compress(registry, data_dir, str(result.version))


def _demo_serve(registry: Path, dataset: Any, workdir: Path, shifted: Any) -> None:
    """Starts the real service in a thread and uses it as a client would; then the online
    loop: events through the API into the durable log, the learner, and the hot swap."""
    import secrets
    import statistics
    import time

    import httpx

    from recloop.serve.app import ServiceConfig
    from recloop.serve.server import serve_in_thread

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
        user = str(dataset.users.to_raw([0])[0])

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
        timings = []
        for i in range(200):
            started = time.perf_counter()
            http.get(
                f"/v1/users/{dataset.users.to_raw([i % dataset.num_users])[0]}/recommendations"
            )
            timings.append((time.perf_counter() - started) * 1000)
        stdout.print(
            f"200 sequential requests from this process: median {statistics.median(timings):.2f} "
            "ms each (a demo, not a benchmark: see bench/serve.py)",
            highlight=False,
        )
        stdout.rule("5. online: events -> log -> learner -> delta version -> hot swap")
        _demo_online(http, key, registry, events_path, workdir / "online", shifted)


def _demo_online(
    http: Any, key: str, registry: Path, events_path: Path, run_dir: Path, shifted: Any
) -> None:
    import time

    import polars as pl

    from recloop.data.synthetic import generate_events
    from recloop.events import open_event_log
    from recloop.online.learner import OnlineConfig, OnlineLearner
    from recloop.registry import Registry

    # A shifted stream: the generator with another seed has other item-to-item successors,
    # which the trained model has never seen; the online learner has to pick them up.
    frame = pl.concat(list(generate_events(shifted)))
    frame = frame.filter(pl.col("user") < 1000).sort("timestamp")
    events = [
        {"user_id": str(u), "item_id": str(i), "timestamp": float(t)}
        for u, i, t in frame.select("user", "item", "timestamp").iter_rows()
    ]
    popular = events[0]["item_id"]
    for n in range(3):  # a brand-new item, right after a known one, for three users
        user = f"new-user-{n}"
        events += [{"user_id": user, "item_id": popular}, {"user_id": user, "item_id": "new-1"}]
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
        f"prequential HR@10 (each event scored before it is learned): online "
        f"{totals['online_HR@10']:.4f} vs frozen {totals['frozen_HR@10']:.4f} "
        f"(plot: {run_dir / 'prequential.png'})",
        highlight=False,
    )
    deadline = time.monotonic() + 120
    model = http.get("/v1/model").json()
    while model["version"] != summary.version and time.monotonic() < deadline:
        time.sleep(0.25)
        model = http.get("/v1/model").json()
    stdout.print(f"the service (following the registry) now serves {model['version']}")
    similar = http.get("/v1/items/new-1/similar", params={"k": 5})
    if similar.status_code == 200:
        items = ", ".join(item["item_id"] for item in similar.json()["items"])
        stdout.print(f"GET /v1/items/new-1/similar?k=5 (the new item is served): {items}")
    else:
        stdout.print(f"GET /v1/items/new-1/similar: {similar.status_code} {similar.text}")


def _demo_compress(registry: Path, data_dir: Path, version: str) -> None:
    from recloop.compress.pipeline import CompressOptions, compress_version
    from recloop.registry import Registry
    from recloop.serve.runtime import LoadOptions, load_bundle

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
        stdout.print(
            f"{result.version} loads for serving: {bundle.engine.name} engine, parity checked; "
            f"also: recloop compress --method prune-structured|distill, recloop export",
            highlight=False,
        )
    finally:
        bundle.close()


def _popularity_hr10(split: Any) -> float:
    import numpy as np

    counts = np.bincount(np.asarray(split.train.items))
    counts[0] = 0
    top = np.argsort(-counts, kind="stable")[:10]
    hits = np.isin(split.valid.targets, top)
    return float(hits.mean()) if len(hits) else math.nan


if __name__ == "__main__":
    main()
