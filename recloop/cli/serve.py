"""`recloop serve`: a registry version behind the HTTP API (the options map onto the fields of
`recloop.serve.service.ServiceConfig` and `recloop.serve.bundle.LoadOptions`, which check them)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from recloop.cli.common import RegistryOption, stderr
from recloop.errors import ConfigError

if TYPE_CHECKING:
    from recloop.serve.service import ServiceConfig

ServeVersionOption = Annotated[
    str, typer.Option(help="Version to serve: id, latest, production or auto.")
]
HostOption = Annotated[str, typer.Option(help="Bind address (loopback by default).")]
RedisUrlOption = Annotated[
    str | None,
    typer.Option(help="redis://... for shared state and cache (default: in-process)."),
]
DataOption = Annotated[
    Path | None, typer.Option(help="Dataset for users' history (default: the version's).")
]
EngineOption = Annotated[str, typer.Option(help="onnx (fast, CPU) or torch (eager; CPU or cuda).")]
IndexOption = Annotated[
    str, typer.Option(help="exact, exact-int8, ivf, milvus (exact) or milvus-ivf.")
]
IndexUriOption = Annotated[
    str | None,
    typer.Option(help="milvus: http://host:19530 or a milvus-lite .db file (default: a temp one)."),
]
IndexAliasOption = Annotated[
    str | None,
    typer.Option(help="milvus: the alias to search (one per replica on a shared server)."),
]
MinRecallOption = Annotated[
    float, typer.Option(help="ivf, milvus-ivf: recall@10 vs exact to reach.")
]
MaxBatchOption = Annotated[int, typer.Option(help="Requests per micro-batch (1 = off).")]
MaxWaitOption = Annotated[int, typer.Option(help="Wait for more requests (microseconds).")]
MaxQueueOption = Annotated[int, typer.Option(help="Queued requests before 503.")]
CacheTtlOption = Annotated[float, typer.Option(help="Result cache TTL (seconds).")]
StateSnapshotOption = Annotated[
    Path | None, typer.Option(help="In-process state: snapshot file (load/save).")
]
FollowOption = Annotated[
    float | None, typer.Option(help="Poll the registry every N s and hot-swap.")
]
DeviceOption = Annotated[str, typer.Option(help="cpu or cuda (torch engines).")]
CacheDirOption = Annotated[
    Path | None, typer.Option(help="Keep exported ONNX files here between starts.")
]
MaxBodyOption = Annotated[int, typer.Option(help="Largest request body.")]
EventLogOption = Annotated[
    str | None,
    typer.Option(help="Durable log of POST /v1/events: a path (SQLite) or redis://..."),
]
SnapshotEveryOption = Annotated[
    float, typer.Option(help="In-process state: write the snapshot every N s (if changed).")
]
ThreadsOption = Annotated[
    int | None,
    typer.Option(help="Inference threads (default: the cores given / recloop processes here)."),
]
IncrementalOption = Annotated[
    bool,
    typer.Option(help="HSTU without absolute positions: encode only users' new events (KV cache)."),
]
IncrementalWindowOption = Annotated[
    str, typer.Option(help="Full window: recompute (exact) or drop-oldest (approximate).")
]
KvCacheOption = Annotated[float, typer.Option(help="--incremental-encoding: cache budget (MiB).")]
ExperimentOption = Annotated[
    Path | None,
    typer.Option(help="Experiment TOML: users split between arms (needs --event-log)."),
]
ProtectOption = Annotated[
    str,
    typer.Option(help="Read-only endpoints that need the API key too: docs,metrics,model."),
]


def serve_command(
    ctx: typer.Context,
    registry: RegistryOption,
    version: ServeVersionOption = "auto",
    host: HostOption = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    redis_url: RedisUrlOption = None,
    data: DataOption = None,
    engine: EngineOption = "onnx",
    index: IndexOption = "exact",
    index_uri: IndexUriOption = None,
    index_alias: IndexAliasOption = None,
    shards: Annotated[int, typer.Option(help="Item index shards.")] = 1,
    min_recall: MinRecallOption = 0.95,
    max_batch: MaxBatchOption = 32,
    max_wait_us: MaxWaitOption = 500,
    max_queue: MaxQueueOption = 1024,
    cache: Annotated[bool, typer.Option(help="Result cache per user.")] = True,
    cache_ttl: CacheTtlOption = 60.0,
    state_snapshot: StateSnapshotOption = None,
    follow: FollowOption = None,
    threads: ThreadsOption = None,
    device: DeviceOption = "cpu",
    cache_dir: CacheDirOption = None,
    max_body_bytes: MaxBodyOption = 1 << 20,
    event_log: EventLogOption = None,
    snapshot_every: SnapshotEveryOption = 30.0,
    protect: ProtectOption = "",
    incremental_encoding: IncrementalOption = False,
    incremental_window: IncrementalWindowOption = "recompute",
    kv_cache_mb: KvCacheOption = 256.0,
    experiment: ExperimentOption = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
) -> None:
    """Serve recommendations over HTTP (API key for writes: env RECLOOP_API_KEY)."""
    from recloop.threads import claim_threads

    # Registered for as long as it serves, so that a learner started beside it takes its share.
    with claim_threads("serve", threads) as choice:
        _limit_native_threads(choice.threads)
        # The options by name (threads as chosen); the config types check them.
        config = _service_config({**ctx.params, "threads": choice.threads})
        if not 0 < port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {port}")
        _run(config, host, port, log_level, choice.describe())


def _limit_native_threads(threads: int) -> None:
    """Before numpy/faiss/torch load: their BLAS and OpenMP pools default to one thread per
    core and spin while idle, which on 2 cores takes a whole core from the event loop. The
    service computes on one inference thread with --threads intra-op threads (chosen by
    recloop.threads unless given), so the pools get that many."""
    import os

    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(threads))


def _service_config(options: dict[str, Any]) -> ServiceConfig:
    """The `recloop serve` options as the service's typed config (which validates them)."""
    import os

    from recloop.serve.bundle import LoadOptions
    from recloop.serve.service import ServiceConfig

    load = LoadOptions(
        engine=options["engine"],
        index=options["index"],
        index_uri=options["index_uri"],
        index_alias=options["index_alias"],
        shards=options["shards"],
        max_batch=max(options["max_batch"], 1),
        threads=options["threads"],
        device=options["device"],
        min_recall=options["min_recall"],
        data=options["data"],
        cache_dir=options["cache_dir"],
        incremental_encoding=options["incremental_encoding"],
        incremental_window=options["incremental_window"],
        kv_cache_bytes=_mebibytes(options["kv_cache_mb"]),
        kv_url=options["redis_url"],  # the states beside the user state: shared by replicas
    )
    protect: str = options["protect"]
    experiment = None
    if options["experiment"] is not None:
        from recloop.experiments import load_experiment

        if options["version"] != "auto":
            raise ConfigError("--version and --experiment: the arms name the versions")
        experiment = load_experiment(options["experiment"])
    return ServiceConfig(
        registry=options["registry"],
        ref=options["version"],
        load=load,
        state_url=options["redis_url"],
        state_snapshot=options["state_snapshot"],
        cache=options["cache"],
        cache_ttl=options["cache_ttl"],
        max_batch=options["max_batch"],
        max_wait_us=options["max_wait_us"],
        max_queue=options["max_queue"],
        api_key=os.environ.get("RECLOOP_API_KEY") or None,
        max_body_bytes=options["max_body_bytes"],
        follow_seconds=options["follow"],
        event_log=options["event_log"],
        snapshot_seconds=options["snapshot_every"],
        protected=frozenset(name.strip() for name in protect.split(",") if name.strip()),
        experiment=experiment,
    )


def _mebibytes(value: float) -> int:
    if not value > 0:
        raise ConfigError(f"--kv-cache-mb must be > 0, got {value}")
    return max(1, int(value * (1 << 20)))


def _run(config: ServiceConfig, host: str, port: int, log_level: str, threads: str) -> None:
    import logging

    from recloop.serve.server import run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def announce(version: str) -> None:
        # Said once it really starts: an error before that stays a one-line message.
        stderr.print(f"recloop serve: {threads}", highlight=False)
        stderr.print(f"recloop serve: {version} at http://{host}:{port} (API docs at /docs)")

    # The version is loaded (and verified) before the port is bound: a broken one is an error.
    run_server(config, host=host, port=port, log_level=log_level, on_loaded=announce)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
