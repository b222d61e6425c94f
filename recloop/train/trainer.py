"""The training loop: one linear function a reader can follow top to bottom.

Single process:
    recloop train --config configs/beauty/sasrec.toml --data data/beauty --registry registry
Data-parallel (gloo on CPU, NCCL on GPU), same arguments, same global batch:
    torchrun --nproc_per_node=2 -m recloop.cli train --config ... --data ... --registry ...

Every process reads the same dataset and takes its slice of each global batch; the loss is
summed over a process's tokens and divided by the token count of the whole global batch, so the
averaged DDP gradient equals the one-process gradient. Only rank 0 writes (metrics, plots,
checkpoints, the registry version). A run stopped by `--max-minutes` (or killed) resumes
exactly from its last checkpoint with `--resume RUN_DIR`.
"""

from __future__ import annotations

import copy
import csv
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from recloop.config import ExperimentConfig, TrainConfig, ValidationProtocol
from recloop.data.batches import (
    COMPILE_WIDTHS,
    TrainingWindows,
    WindowConfig,
    make_loader,
    pad_to_width,
    trim_left_padding,
)
from recloop.data.dataset import SequenceDataset
from recloop.data.splits import EvalExamples
from recloop.errors import ConfigError
from recloop.evaluate import EvalConfig, evaluate
from recloop.models.base import SequentialEncoder
from recloop.models.embeddings import folded_state_dict, with_item_attributes
from recloop.models.factory import build_model, config_to_dict
from recloop.train import checkpoint
from recloop.train.averaging import averaged, weight_average
from recloop.train.distributed import agree, all_reduce_sum, init_distributed
from recloop.train.losses import next_item_loss


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

    # ---- data: leave-one-out split, training windows, this rank's loader
    dataset = SequenceDataset(data_dir)
    split = dataset.leave_one_out()
    windows = TrainingWindows(split.train, window_config(cfg))
    if len(windows) < cfg.batch_size:
        raise ConfigError(
            f"train.batch_size {cfg.batch_size} is larger than the {len(windows)} training windows"
        )
    loader = make_loader(
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
    steps_per_epoch = len(loader)
    total_steps = cfg.max_steps or cfg.max_epochs * steps_per_epoch
    eval_every = cfg.eval_every_steps or cfg.eval_every_epochs * steps_per_epoch

    # ---- model and optimizer
    model_config = {k: v for k, v in config.model.items() if k != "type"}
    model_config.setdefault("max_length", cfg.max_length)
    model_config["num_items"] = dataset.num_items
    model = build_model(str(config.model["type"]), model_config).to(ctx.device)
    check_samples(model, cfg)
    if cfg.item_attributes:
        with_item_attributes(model, _attribute_ids(dataset), model.config.init_std)
    optimizer = _adamw(model, cfg, fused=ctx.device.type == "cuda")
    forward: torch.nn.Module = model
    if ctx.distributed:
        forward = DistributedDataParallel(model)
    if cfg.compile:
        # One static graph per padded width (see pad_to_width below); without this, dynamo
        # switches to a dynamic-shape graph after the second width and recompiles again.
        torch._dynamo.config.automatic_dynamic_shapes = False
        forward = torch.compile(forward)  # type: ignore[assignment]
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    # Validation, selection and publishing see the weight average when the run keeps one.
    average = weight_average(model, cfg.ema_decay)

    # ---- state that a checkpoint carries
    run_dir = Path(run_dir)
    step, epoch, batch_in_epoch = 0, 0, 0
    best_value, best_step, evals_since_best = -math.inf, 0, 0
    best_metrics: dict[str, float] = {}
    history: list[dict[str, Any]] = []
    if resume:
        found = checkpoint.latest_checkpoint(run_dir)
        if found is None:
            raise ConfigError(f"{run_dir}: no checkpoint to resume from")
        state = checkpoint.load_checkpoint(found, model, optimizer)
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        best_value, best_step = state["best_value"], state["best_step"]
        evals_since_best, best_metrics = state["evals_since_best"], state["best_metrics"]
        history = state["history"]
        if average is not None:
            average.load_state_dict(checkpoint.load_average(found), state["average_updates"])
    best_weights = _load_best(run_dir) if resume and best_step else None

    test_config = _eval_config(cfg, "full")  # published test metrics: full ranking always
    valid_config = validation_eval_config(cfg)
    valid_prefix = validation_metric_prefix(cfg)
    select_key = valid_prefix + cfg.select_metric

    def evaluate_on(examples: EvalExamples, eval_config: EvalConfig) -> dict[str, float]:
        """Metrics over every rank's shard, all-reduced (floats only)."""
        metrics = evaluate(
            model,
            examples,
            split.source,
            eval_config,
            device=ctx.device,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        return {k: v for k, v in metrics.items() if isinstance(v, float)}

    def validate() -> dict[str, float]:
        return {valid_prefix + k: v for k, v in evaluate_on(split.valid, valid_config).items()}

    tokens_seen, train_seconds, loss_sum, loss_steps = 0, 0.0, 0.0, 0
    stopped_by = "max_steps" if cfg.max_steps else "max_epochs"
    started = time.perf_counter()
    budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    progress = _Progress(total_steps, step, enabled=show_progress and ctx.is_main)

    prefixes = cfg.samples == "prefixes"
    model.train()
    stop = False
    while step < total_steps and not stop:
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        for index, batch in enumerate(loader):
            if index < batch_in_epoch:  # resuming mid-epoch: same order, skip what was done
                continue
            tick = time.perf_counter()
            if cfg.trim_padding:
                batch = trim_left_padding(batch)
                if cfg.compile:  # a few static shapes: one compilation each, then no more
                    batch = pad_to_width(batch, widths=(*COMPILE_WIDTHS, cfg.max_length))
            input_ids = batch["input_ids"].to(ctx.device, non_blocking=True)  # [B, L]
            targets = batch["target_ids"].to(ctx.device, non_blocking=True)  # [B, L]
            timestamps = batch["timestamps"].to(ctx.device, non_blocking=True)  # [B, L]
            _set_lr(optimizer, cfg, step, total_steps)
            if prefixes:  # one target per window, at its end: the rest is never scored
                targets = targets[:, -1:]  # [B, 1]
            with autocast:
                hidden = forward(input_ids, timestamps, last_only=prefixes)  # [B, L or 1, D]
                loss_total, tokens = next_item_loss(
                    model, hidden, targets, cfg, dataset.num_items, inputs=input_ids
                )
            global_tokens = all_reduce_sum(tokens.detach().clone().float(), ctx)
            # DDP averages gradients over ranks; scaling by world / global tokens makes that
            # average the mean over every token of the global batch.
            loss = loss_total * ctx.world_size / global_tokens.clamp_min(1.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            if cfg.grad_clip:  # None or 0: no clipping
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if average is not None:
                average.update()
            step += 1
            batch_in_epoch = index + 1
            train_seconds += time.perf_counter() - tick
            tokens_seen += int(global_tokens.item())
            loss_sum += float(loss.item())  # rank 0's share, scaled to the global mean
            loss_steps += 1
            progress.update(step, loss_sum / loss_steps, tokens_seen / max(train_seconds, 1e-9))

            out_of_time = time.perf_counter() - started > budget
            if step % eval_every == 0 or step == total_steps or out_of_time:
                with averaged(average):  # the weights validated are the ones kept
                    metrics = validate()
                    value = float(metrics[select_key])
                    weights = copy.deepcopy(model.state_dict()) if value > best_value else None
                model.train()
                history.append(
                    {
                        "step": step,
                        "epoch": round(step / steps_per_epoch, 3),
                        "elapsed_s": round(time.perf_counter() - started, 2),
                        "train_loss": round(loss_sum / max(loss_steps, 1), 5),
                        "lr": optimizer.param_groups[0]["lr"],
                        "tokens_per_s": round(tokens_seen / max(train_seconds, 1e-9)),
                        **{f"valid/{k}": v for k, v in metrics.items()},
                    }
                )
                loss_sum, loss_steps = 0.0, 0
                if weights is not None:  # improved
                    best_value, best_step, evals_since_best = value, step, 0
                    best_metrics, best_weights = metrics, weights
                    if ctx.is_main:
                        _save_best(run_dir, best_weights)
                else:
                    evals_since_best += 1
                progress.log(
                    f"step {step}: valid {select_key} {value:.4f} "
                    f"(best {best_value:.4f} at step {best_step})"
                )
                if evals_since_best >= cfg.patience:
                    stopped_by = "early_stopping"
            if out_of_time and stopped_by != "early_stopping":
                stopped_by = "max_minutes"
            if stop_at_step is not None and step >= stop_at_step:
                stopped_by = "interrupted"
            finished = stopped_by in ("early_stopping", "max_minutes", "interrupted")
            stop = agree(finished, ctx)  # every rank must leave the loop at the same step
            if stop or step >= total_steps:
                break
        if batch_in_epoch >= steps_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
    progress.close()

    if ctx.is_main:
        state = {
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "best_value": best_value,
            "best_step": best_step,
            "evals_since_best": evals_since_best,
            "best_metrics": best_metrics,
            "history": history,
            "config": config.to_dict(),
        }
        if average is not None:
            state["average_updates"] = average.updates
        kept = average.state_dict() if average is not None else None
        checkpoint.save_checkpoint(run_dir, model, optimizer, state, average=kept)
        _write_history(run_dir, history)

    if best_weights is not None:
        model.load_state_dict(best_weights)
    test_metrics: dict[str, float] = {}
    version = None
    if stopped_by != "interrupted":
        test_metrics = evaluate_on(split.test, test_config)
        if ctx.is_main and registry_dir is not None:
            version = _publish(
                registry_dir,
                model,
                dataset,
                config,
                best_metrics,
                test_metrics,
                run_dir,
                training={
                    "steps": step,
                    "best_step": best_step,
                    "epochs": round(step / steps_per_epoch, 3),
                    "train_seconds": round(train_seconds, 2),
                    "tokens_per_second": round(tokens_seen / max(train_seconds, 1e-9)),
                    "world_size": ctx.world_size,
                    "stopped_by": stopped_by,
                    "command": command or " ".join(sys.argv),
                },
            )
    return TrainResult(
        run_dir=run_dir,
        best_step=best_step,
        best_metrics=best_metrics,
        test_metrics=test_metrics,
        steps=step,
        epochs=step / steps_per_epoch,
        train_seconds=train_seconds,
        tokens_per_second=tokens_seen / max(train_seconds, 1e-9),
        stopped_by=stopped_by,
        version=version,
        model=model,
    )


# --------------------------------------------------------------------------- helpers


# Seeds the validation split's sampled negatives. `recloop eval` draws the test split's with
# seed 0, keyed by the same example positions: a different seed keeps checkpoint selection from
# ever seeing the negatives that the test ranks against.
VALID_NEGATIVES_SEED = 1


def _attribute_ids(dataset: SequenceDataset) -> torch.Tensor:
    index = dataset.item_attributes
    if index is None:
        raise ConfigError(
            f"train.item_attributes needs a dataset prepared with --item-attributes; "
            f"{dataset.directory} has none"
        )
    return torch.from_numpy(index)  # int32; the embedding keeps it as int64


def window_config(cfg: TrainConfig) -> WindowConfig:
    """How `cfg` cuts the training split into windows (or, with samples = "prefixes", into
    one window per prefix)."""
    return WindowConfig(
        cfg.max_length, cfg.max_windows_per_user, prefixes=cfg.samples == "prefixes"
    )


def check_samples(model: SequentialEncoder, cfg: TrainConfig) -> None:
    """A non-causal model trained on whole windows would see each position's target among
    the items after it; refuse that before any step."""
    if not model.causal and cfg.samples != "prefixes":
        raise ConfigError(
            f"model {type(model).__name__} is not causal (its hidden state at a position sees "
            f"the items after it), so it must train with train.samples = 'prefixes', "
            f"got {cfg.samples!r}"
        )


def validation_eval_config(cfg: TrainConfig) -> EvalConfig:
    """How a run scores its validation split (full ranking, or sampled-100 if configured)."""
    return _eval_config(cfg, cfg.eval_protocol)


def _eval_config(cfg: TrainConfig, protocol: ValidationProtocol) -> EvalConfig:
    """Evaluation during training under `protocol`; only sampled negatives use their own seed
    (seed 0 keeps the full protocol's `eval_max_users` subset as it always was)."""
    return EvalConfig(
        max_length=cfg.max_length,
        user_batch_size=cfg.eval_user_batch_size,
        protocol=protocol,
        max_users=cfg.eval_max_users,
        seed=VALID_NEGATIVES_SEED if protocol == "sampled100" else 0,
    )


def validation_metric_prefix(cfg: TrainConfig) -> str:
    """'' for full ranking; 'sampled100/' so sampled metrics never pass for full-ranking ones."""
    return "" if cfg.eval_protocol == "full" else f"{cfg.eval_protocol}/"


def _adamw(model: torch.nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """Weight decay on matrices only, never on biases, norms or the embedding table."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.dim() >= 2 and "embedding" not in name:
            decay.append(parameter)
        else:
            no_decay.append(parameter)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warm-up, then constant, cosine or linear decay to lr * min_lr_ratio."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    factor = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * factor)


def _set_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int, total: int) -> None:
    lr = lr_at(cfg, step, total)
    for group in optimizer.param_groups:
        group["lr"] = lr


def _save_best(run_dir: Path, weights: dict[str, torch.Tensor]) -> None:
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


def _publish(
    registry_dir: Path,
    model: SequentialEncoder,
    dataset: SequenceDataset,
    config: ExperimentConfig,
    valid_metrics: dict[str, float],
    test_metrics: dict[str, float],
    run_dir: Path,
    training: dict[str, Any],
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
    )


def item_counts(dataset: SequenceDataset) -> np.ndarray:
    """int64 counts [num_items + 1] over every event of the dataset."""
    return np.bincount(np.asarray(dataset.sequences.items), minlength=dataset.num_items + 1).astype(
        np.int64
    )


class _Progress:
    """A rich progress bar with loss and tokens/s on a terminal; periodic lines otherwise."""

    def __init__(self, total: int, done: int, *, enabled: bool, label: str = "train") -> None:
        self.enabled = enabled
        self.bar: Any = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from recloop.progress import stderr

        self.bar = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:,.0f} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=stderr,
            disable=not stderr.is_terminal,
        )
        self.task = self.bar.add_task(label, total=total, completed=done, loss=0.0, rate=0.0)
        self.bar.start()

    def update(self, step: int, loss: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, rate=rate)

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        from recloop.progress import stderr

        stderr.print(message, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def describe_metrics(metrics: dict[str, float], keys: tuple[str, ...]) -> str:
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)
