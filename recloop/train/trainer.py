"""`recloop train`: config -> state -> the loop -> the best weights tested and published.

Single process:
    recloop train --config configs/beauty/sasrec.toml --data data/beauty --registry registry
Data-parallel (gloo on CPU, NCCL on GPU), same arguments, same global batch:
    torchrun --nproc_per_node=2 -m recloop.cli train --config ... --data ... --registry ...

The loop itself is :func:`recloop.train.loop.run`. Every process reads the same dataset and
takes its slice of each global batch. Only rank 0 writes (metrics, plots, checkpoints, the
registry version). A run stopped by `--max-minutes` (or killed) resumes exactly from its last
checkpoint with `--resume RUN_DIR`.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from recloop.config import ExperimentConfig, TrainConfig
from recloop.data.batches import TrainingWindows, make_loader
from recloop.data.dataset import SequenceDataset
from recloop.data.splits import EvalExamples, Split
from recloop.errors import ConfigError
from recloop.evaluate import EvalConfig, evaluate
from recloop.models.base import SequentialEncoder
from recloop.models.embeddings import folded_state_dict, with_item_attributes
from recloop.models.factory import build_model, config_to_dict
from recloop.registry.sharded import ShardedTable
from recloop.train import checkpoint
from recloop.train.distributed import DistContext, init_distributed
from recloop.train.loop import (
    LoopPlan,
    TrainState,
    check_samples,
    eval_config,
    next_item,
    run,
    validation_eval_config,
    validation_metric_prefix,
    window_config,
)
from recloop.train.progress import Progress
from recloop.train.sharding.run import BEST_PREFIX, ShardedTraining, build_sharded_model


@dataclass
class TrainResult:
    run_dir: Path
    best_step: int
    best_metrics: dict[str, float]
    test_metrics: dict[str, float]
    steps: int
    epochs: float
    train_seconds: float
    tokens_per_second: float
    stopped_by: str
    version: str | None = None
    model: SequentialEncoder | None = field(default=None, repr=False)


def train(
    config: ExperimentConfig,
    data_dir: Path,
    run_dir: Path,
    *,
    registry_dir: Path | None = None,
    resume: bool = False,
    device: str | None = None,
    stop_at_step: int | None = None,
    command: str | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Trains, keeps the best validation checkpoint, tests it, and publishes it (rank 0)."""
    cfg = config.train
    ctx = init_distributed(device)
    if cfg.batch_size % ctx.world_size:
        raise ConfigError(
            f"train.batch_size {cfg.batch_size} must divide by the {ctx.world_size} processes"
        )
    torch.manual_seed(cfg.seed)
    run_dir = Path(run_dir)

    # ---- data, model, the state the loop changes, and what the loop does
    dataset = SequenceDataset(data_dir)
    split = dataset.leave_one_out()
    loader = _loader(split, cfg, ctx)
    model, sharded = _build_model(config, dataset, ctx)
    plan = LoopPlan(
        cfg,
        steps_per_epoch=len(loader),
        context=ctx,
        loss=next_item(cfg, dataset.num_items),
        validate=_validation(model, split, cfg, ctx, sharded),
        forward=_forward_module(model, ctx),
        on_best=_on_best(run_dir, ctx, sharded),
        stop_at_step=stop_at_step,
        before_forward=sharded.before_forward if sharded else None,
        keep_with_best=sharded.keep_with_best if sharded else None,
    )
    state = TrainState.start(model, cfg, plan.total_steps, fused=ctx.device.type == "cuda")
    if resume:
        _resume(state, run_dir, sharded)

    # ---- the loop
    progress = Progress(plan.total_steps, state.step, enabled=show_progress and ctx.is_main)
    run(state, loader, plan, progress)
    table_entry = sharded.save_checkpoint(run_dir, state.step) if sharded else None
    if ctx.is_main:
        _save_run(run_dir, state, config, table_entry)

    # ---- the best weights, tested and published
    if state.best_weights is not None:
        best = sharded.restore_best(state.best_weights) if sharded else state.best_weights
        model.load_state_dict(best)
    test_metrics, version = _test_and_publish(
        model, dataset, split, config, state, plan, run_dir, registry_dir, command, sharded
    )
    if sharded is not None:
        sharded.table.close()
    return _result(run_dir, state, plan, test_metrics, version)


def _on_best(
    run_dir: Path, ctx: DistContext, sharded: ShardedTraining | None
) -> Callable[[TrainState], None] | None:
    """Saves the best weights as they improve: rank 0 the dense ones, every rank its shards."""
    if sharded is None and not ctx.is_main:
        return None

    def save(state: TrainState) -> None:
        weights = state.best_weights
        if weights is None:
            return
        if sharded is not None:
            sharded.save_best(run_dir, weights)
        if ctx.is_main:
            _save_best(run_dir, {k: v for k, v in weights.items() if not k.startswith(BEST_PREFIX)})

    return save


def _test_and_publish(
    model: SequentialEncoder,
    dataset: SequenceDataset,
    split: Split,
    config: ExperimentConfig,
    state: TrainState,
    plan: LoopPlan,
    run_dir: Path,
    registry_dir: Path | None,
    command: str | None,
    sharded: ShardedTraining | None = None,
) -> tuple[dict[str, float], str | None]:
    """Full-ranking test metrics of the kept weights (every rank), published by rank 0;
    nothing for an interrupted run (it resumes instead). A sharded table is published as one
    file per shard, each written by the rank that holds it."""
    if state.stopped_by == "interrupted":
        return {}, None
    ctx = plan.context
    test_config = eval_config(config.train, "full")
    test_metrics = _evaluate_on(model, split, split.test, test_config, ctx, sharded)
    version = None
    shards = None
    if sharded is not None and registry_dir is not None:
        files = sharded.write_publish_shards(run_dir)
        shards = ShardedTable(plan=sharded.plan, files=tuple(files))
    if ctx.is_main and registry_dir is not None:
        training = _training_summary(state, plan, command)
        if sharded is not None:
            training["sharding"] = sharded.describe()
        version = _publish(
            registry_dir, model, dataset, config, state.best_metrics, test_metrics, run_dir,
            training=training, shards=shards,
        )  # fmt: skip
    return test_metrics, version


def _result(
    run_dir: Path,
    state: TrainState,
    plan: LoopPlan,
    test_metrics: dict[str, float],
    version: str | None,
) -> TrainResult:
    return TrainResult(
        run_dir=run_dir,
        best_step=state.best_step,
        best_metrics=state.best_metrics,
        test_metrics=test_metrics,
        steps=state.step,
        epochs=state.step / plan.steps_per_epoch,
        train_seconds=state.train_seconds,
        tokens_per_second=state.tokens_per_second,
        stopped_by=state.stopped_by,
        version=version,
        model=state.model,
    )


# --------------------------------------------------------------------------- set-up


def _loader(split: Split, cfg: TrainConfig, ctx: DistContext) -> Any:
    """This rank's loader over the leave-one-out training windows."""
    windows = TrainingWindows(split.train, window_config(cfg))
    if len(windows) < cfg.batch_size:
        raise ConfigError(
            f"train.batch_size {cfg.batch_size} is larger than the {len(windows)} training windows"
        )
    return make_loader(
        windows,
        cfg.batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=cfg.seed,
        drop_last=True,  # equal batches on every rank, every step
        num_workers=cfg.num_workers,
        pin_memory=ctx.device.type == "cuda",
        bucket_by_length=cfg.bucket_by_length,
    )


def _build_model(
    config: ExperimentConfig, dataset: SequenceDataset, ctx: DistContext
) -> tuple[SequentialEncoder, ShardedTraining | None]:
    """The model, and with train.sharding its sharded table (the model then holds no table)."""
    cfg = config.train
    model_config = {k: v for k, v in config.model.items() if k != "type"}
    model_config.setdefault("max_length", cfg.max_length)
    model_config["num_items"] = dataset.num_items
    if cfg.max_items is not None and dataset.num_items > cfg.max_items:
        raise ConfigError(
            f"train.max_items = {cfg.max_items} but the dataset has {dataset.num_items} items: "
            "raise it, or prepare the dataset with fewer items"
        )
    if cfg.sharding != "none":
        sharded = build_sharded_model(str(config.model["type"]), model_config, cfg, ctx)
        check_samples(sharded.model, cfg)
        return sharded.model, sharded
    model = build_model(str(config.model["type"]), model_config).to(ctx.device)
    check_samples(model, cfg)
    if cfg.item_attributes:
        with_item_attributes(model, _attribute_ids(dataset), model.config.init_std)
    return model, None


def _forward_module(model: SequentialEncoder, ctx: DistContext) -> Any:
    """The module the loop calls forward on: the model, under DDP when distributed. (No
    torch.compile: it measured slower than eager on CPU, see config.REMOVED_KEYS.)"""
    if ctx.distributed:
        return DistributedDataParallel(model)
    return model


def _validation(
    model: SequentialEncoder,
    split: Split,
    cfg: TrainConfig,
    ctx: DistContext,
    sharded: ShardedTraining | None,
) -> Any:
    """The loop's validation: metrics named with the protocol's prefix."""
    config = validation_eval_config(cfg)
    prefix = validation_metric_prefix(cfg)

    def validate() -> dict[str, float]:
        metrics = _evaluate_on(model, split, split.valid, config, ctx, sharded)
        return {prefix + k: v for k, v in metrics.items()}

    return validate


def _evaluate_on(
    model: SequentialEncoder,
    split: Split,
    examples: EvalExamples,
    config: EvalConfig,
    ctx: DistContext,
    sharded: ShardedTraining | None = None,
) -> dict[str, float]:
    """Metrics over every rank's shard, all-reduced (floats only); a sharded table is
    gathered for the evaluation (collective)."""
    with sharded.whole_table() if sharded is not None else nullcontext():
        metrics = evaluate(
            model,
            examples,
            split.source,
            config,
            device=ctx.device,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


def _resume(state: TrainState, run_dir: Path, sharded: ShardedTraining | None) -> None:
    """The state of the run's latest checkpoint, and its best weights so far."""
    found = checkpoint.latest_checkpoint(run_dir)
    if found is None:
        raise ConfigError(f"{run_dir}: no checkpoint to resume from")
    saved = checkpoint.load_checkpoint(found, state.model, state.optimizer)
    if sharded is not None:
        sharded.load_checkpoint(found, saved.get("sharded"))
    elif saved.get("sharded"):
        raise ConfigError(f"{found}: a sharded run's checkpoint; resume it with its train.sharding")
    state.step, state.epoch, state.batch_in_epoch = (
        saved["step"], saved["epoch"], saved["batch_in_epoch"]
    )  # fmt: skip
    state.best_value, state.best_step = saved["best_value"], saved["best_step"]
    state.evals_since_best, state.best_metrics = saved["evals_since_best"], saved["best_metrics"]
    state.history = saved["history"]
    if state.average is not None:
        state.average.load_state_dict(checkpoint.load_average(found), saved["average_updates"])
    state.best_weights = _load_best(run_dir) if state.best_step else None
    if sharded is not None and state.best_weights is not None:
        state.best_weights.update(sharded.load_best(run_dir))


def _save_run(
    run_dir: Path,
    state: TrainState,
    config: ExperimentConfig,
    table_entry: dict[str, Any] | None = None,
) -> None:
    """The checkpoint to resume from (the last weights, not the best), metrics.csv, curves.png."""
    saved: dict[str, Any] = {
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "best_value": state.best_value,
        "best_step": state.best_step,
        "evals_since_best": state.evals_since_best,
        "best_metrics": state.best_metrics,
        "history": state.history,
        "config": config.to_dict(),
    }
    if table_entry is not None:  # the sharded table's rank files (written by every rank)
        saved["sharded"] = table_entry
    if state.average is not None:
        saved["average_updates"] = state.average.updates
    kept = state.average.state_dict() if state.average is not None else None
    checkpoint.save_checkpoint(run_dir, state.model, state.optimizer, saved, average=kept)
    _write_history(run_dir, state.history)


def _training_summary(state: TrainState, plan: LoopPlan, command: str | None) -> dict[str, Any]:
    """The manifest's `training` record of the run."""
    return {
        "steps": state.step,
        "best_step": state.best_step,
        "epochs": round(state.step / plan.steps_per_epoch, 3),
        "train_seconds": round(state.train_seconds, 2),
        "tokens_per_second": round(state.tokens_per_second),
        "world_size": plan.context.world_size,
        "stopped_by": state.stopped_by,
        "command": command or " ".join(sys.argv),
    }


def _attribute_ids(dataset: SequenceDataset) -> torch.Tensor:
    index = dataset.item_attributes
    if index is None:
        raise ConfigError(
            f"train.item_attributes needs a dataset prepared with --item-attributes; "
            f"{dataset.directory} has none"
        )
    return torch.from_numpy(index)  # int32; the embedding keeps it as int64


# --------------------------------------------------------------------------- run files


def _save_best(run_dir: Path, weights: dict[str, torch.Tensor] | None) -> None:
    if weights is None:
        return
    from safetensors.torch import save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".best.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp))
    tmp.replace(run_dir / "best.safetensors")


def _load_best(run_dir: Path) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    path = run_dir / "best.safetensors"
    return load_file(str(path)) if path.is_file() else None


def _write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    if not history:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in history for key in row))
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    _plot_history(run_dir / "curves.png", history)


def _plot_history(path: Path, history: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(steps, [row["train_loss"] for row in history], marker=".")
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    sampled = "valid/sampled100/NDCG@10" in history[0]
    prefix = "valid/sampled100/" if sampled else "valid/"
    for metric in (f"{prefix}NDCG@10", f"{prefix}HR@10"):
        if metric in history[0]:
            right.plot(steps, [row[metric] for row in history], marker=".", label=metric)
    right.set_xlabel("step")
    right.set_ylabel("validation (sampled-100)" if sampled else "validation (full ranking)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- publish


def _publish(
    registry_dir: Path,
    model: SequentialEncoder,
    dataset: SequenceDataset,
    config: ExperimentConfig,
    valid_metrics: dict[str, float],
    test_metrics: dict[str, float],
    run_dir: Path,
    training: dict[str, Any],
    shards: ShardedTable | None = None,
) -> str:
    from recloop.registry import Registry, SideFiles, publish_version
    from recloop.registry.sidefiles import CURVES_FILE, METRICS_FILE

    side = SideFiles(
        vocabulary=dataset.directory / "items.parquet",
        # Interaction counts per item (index = dense id): serving's popularity fallback.
        item_counts=item_counts(dataset),
        other={n: run_dir / n for n in (METRICS_FILE, CURVES_FILE) if (run_dir / n).is_file()},
    )
    return publish_version(
        Registry(registry_dir),
        {k: v.detach().contiguous().cpu() for k, v in folded_state_dict(model).items()},
        model=config_to_dict(model),
        dataset={
            "checksum": dataset.checksum,
            "path": str(dataset.directory.resolve()),
            "counts": dataset.manifest["counts"],
        },
        metrics={
            **{f"valid/{k}": v for k, v in valid_metrics.items()},
            **{f"test/{k}": v for k, v in test_metrics.items()},
        },
        method="train",
        training={**training, "config": config.to_dict()},
        side=side,
        sharded=shards,
    )


def item_counts(dataset: SequenceDataset) -> np.ndarray:
    """int64 counts [num_items + 1] over every event of the dataset."""
    return np.bincount(np.asarray(dataset.sequences.items), minlength=dataset.num_items + 1).astype(
        np.int64
    )


def describe_metrics(metrics: dict[str, float], keys: tuple[str, ...]) -> str:
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)
