"""`recloop train` and `recloop eval`: a dataset in, a published and measured version out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from recloop.cli.common import JsonOption, RegistryOption, command_line, stderr, stdout
from recloop.errors import ConfigError

if TYPE_CHECKING:
    from recloop.config import ExperimentConfig
    from recloop.train.trainer import TrainResult

MaxMinutesOption = Annotated[float | None, typer.Option(help="Wall-clock training budget.")]
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        help="torch intra-op threads (default: the cores given / recloop processes here)."
    ),
]
RunDirOption = Annotated[
    Path | None, typer.Option(help="Checkpoints, metrics.csv, curves.png (default runs/...).")
]


def train_command(
    data: Annotated[Path, typer.Option("--data", help="Dataset directory (recloop prepare).")],
    registry: RegistryOption,
    config: Annotated[Path | None, typer.Option("--config", help="Experiment TOML.")] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="section.key=value overrides, e.g. train.lr=3e-3")
    ] = None,
    max_minutes: MaxMinutesOption = None,
    run_dir: RunDirOption = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --run-dir exactly.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if any).")] = None,
    threads: ThreadsOption = None,
) -> None:
    """Train a model, keep the best validation checkpoint, publish it to the registry."""
    import time as _time

    import torch

    from recloop.config import load_config
    from recloop.threads import claim_threads
    from recloop.train.trainer import train

    # Registered while it trains (each torchrun rank too), so neighbours take their share.
    with claim_threads("train", threads) as choice:
        torch.set_num_threads(choice.threads)
        extra = list(overrides or [])
        if max_minutes is not None:
            extra.append(f"train.max_minutes={max_minutes}")
        experiment = load_config(config, extra)
        if resume and run_dir is None:
            raise ConfigError("--resume needs --run-dir (the run to continue)")
        if run_dir is None:
            stamp = _time.strftime("%Y%m%d-%H%M%S")
            run_dir = Path("runs") / f"{stamp}-{experiment.model['type']}"
        # Said once the config is good: a bad option or key stays a one-line error.
        stderr.print(f"recloop train: {choice.describe()}", highlight=False)
        result = train(
            experiment,
            data,
            run_dir,
            registry_dir=registry,
            resume=resume,
            device=device,
            command=command_line(),
        )
        if result.version is not None:  # None: a non-zero rank under torchrun (rank 0 reports)
            _print_trained(result, experiment)


def _print_trained(result: TrainResult, experiment: ExperimentConfig) -> None:
    from recloop.train.loop import validation_metric_prefix
    from recloop.train.trainer import describe_metrics

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


def eval_command(
    registry: RegistryOption,
    data: Annotated[Path, typer.Option("--data", help="Dataset directory.")],
    version: Annotated[str, typer.Option(help="Version id, latest or production.")] = "latest",
    protocol: Annotated[str, typer.Option(help="full or sampled100.")] = "full",
    split: Annotated[str, typer.Option(help="test or valid.")] = "test",
    max_users: Annotated[
        int | None, typer.Option(help="Evaluate a random subset of users (sampled100).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for negatives / user subset.")] = 0,
    json_output: JsonOption = False,
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


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("eval")(eval_command)
