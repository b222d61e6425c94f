"""The short training loop of compression: fine-tuning after pruning, and distillation.

It is the trainer's loop (:mod:`recloop.train.trainer`) for a model that already exists, with
the trainer's own pieces: the same training windows and loader, the same losses
(:func:`recloop.train.losses.next_item_loss` unless a distillation loss is given), the same
AdamW groups and learning-rate schedule, the same full-ranking validation to keep the best
weights and stop early. Single process; no checkpoints (a fine-tune is minutes).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from recloop.config import TrainConfig
from recloop.data.batches import TrainingWindows, make_loader, trim_left_padding
from recloop.data.dataset import SequenceDataset
from recloop.data.splits import EvalExamples, Split
from recloop.evaluate import EvalConfig, evaluate
from recloop.models.base import SequentialEncoder
from recloop.progress import stderr
from recloop.train.averaging import averaged, weight_average
from recloop.train.losses import next_item_loss
from recloop.train.trainer import (
    _adamw,
    _Progress,
    _set_lr,
    check_samples,
    validation_eval_config,
    validation_metric_prefix,
    window_config,
)

Batch = dict[str, torch.Tensor]
# (model, hidden [B, L, D], batch) -> (loss summed over tokens, token count)
LossFn = Callable[[SequentialEncoder, torch.Tensor, Batch], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class FitResult:
    steps: int
    epochs: float
    seconds: float
    best_step: int  # 0: no evaluation beat the starting weights (they are kept)
    best_metrics: dict[str, float]
    stopped_by: str  # max_steps | max_epochs | max_minutes | early_stopping
    history: list[dict[str, Any]] = field(default_factory=list)


def evaluate_split(
    model: SequentialEncoder,
    examples: EvalExamples,
    split: Split,
    max_length: int,
    *,
    user_batch_size: int = 1024,
    max_users: int | None = None,
) -> dict[str, float]:
    """Full-ranking metrics (history masked, as the trainer reports them), floats only."""
    config = EvalConfig(max_length=max_length, user_batch_size=user_batch_size, max_users=max_users)
    metrics = evaluate(model, examples, split.source, config)
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


def fit(
    model: SequentialEncoder,
    dataset: SequenceDataset,
    cfg: TrainConfig,
    *,
    loss: LossFn | None = None,
    after_step: Callable[[], None] | None = None,
    evaluate_start: bool = False,
    description: str = "fine-tune",
    show_progress: bool = True,
) -> FitResult:
    """Trains `model` in place on the dataset's leave-one-out training windows and leaves it
    with its best validation weights (in eval mode).

    `loss` replaces the next-item loss of ``cfg.loss``; `after_step` runs after every optimizer
    step (magnitude pruning re-applies its masks there). With `evaluate_start` the starting
    weights are evaluated first and kept if nothing beats them.
    """
    torch.manual_seed(cfg.seed)
    check_samples(model, cfg)
    split = dataset.leave_one_out()
    windows = TrainingWindows(split.train, window_config(cfg))
    loader = make_loader(
        windows,
        min(cfg.batch_size, len(windows)),
        seed=cfg.seed,
        drop_last=True,
        bucket_by_length=cfg.bucket_by_length,
    )
    steps_per_epoch = len(loader)
    total_steps = cfg.max_steps or cfg.max_epochs * steps_per_epoch
    eval_every = cfg.eval_every_steps or cfg.eval_every_epochs * steps_per_epoch
    budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    optimizer = _adamw(model, cfg, fused=False)
    # As in the trainer: validation and the weights kept are the average's, when there is one.
    # It updates after `after_step`, so weights that magnitude pruning masks stay zero in it.
    average = weight_average(model, cfg.ema_decay)

    def next_item(m: SequentialEncoder, hidden: torch.Tensor, batch: Batch) -> tuple[Any, Any]:
        targets = batch["target_ids"]
        return next_item_loss(m, hidden, targets, cfg, dataset.num_items, batch["input_ids"])

    step_loss = loss or next_item

    prefix = validation_metric_prefix(cfg)
    select_key = prefix + cfg.select_metric
    valid_config = validation_eval_config(cfg)

    def validate() -> dict[str, float]:
        """The trainer's validation: same protocol, seed and metric names."""
        metrics = evaluate(model, split.valid, split.source, valid_config)
        return {prefix + k: v for k, v in metrics.items() if isinstance(v, float)}

    def say(message: str) -> None:
        if show_progress:
            stderr.print(f"{description}: {message}", highlight=False)

    best_value, best_step, since_best = -math.inf, 0, 0
    best_metrics: dict[str, float] = {}
    best_weights: dict[str, torch.Tensor] | None = None
    if evaluate_start:
        best_metrics = validate()
        best_value = best_metrics[select_key]
        best_weights = copy.deepcopy(model.state_dict())
        say(f"start: valid {select_key} {best_value:.4f}")
    history: list[dict[str, Any]] = []
    if evaluate_start:
        history.append({"step": 0, **{f"valid/{k}": v for k, v in best_metrics.items()}})
    step, epoch, loss_sum, loss_steps = 0, 0, 0.0, 0
    stopped_by = "max_steps" if cfg.max_steps else "max_epochs"
    started = time.perf_counter()
    bar = _Progress(total_steps, 0, enabled=show_progress, label=description)
    tokens_seen = 0
    prefixes = cfg.samples == "prefixes"
    model.train()
    while step < total_steps:
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        for batch in loader:
            batch = trim_left_padding(batch) if cfg.trim_padding else batch
            _set_lr(optimizer, cfg, step, total_steps)
            if prefixes:  # one target per window, at its end: the rest is never scored
                batch = {**batch, "target_ids": batch["target_ids"][:, -1:]}  # [B, 1]
            hidden = model(batch["input_ids"], batch["timestamps"], last_only=prefixes)
            loss_total, tokens = step_loss(model, hidden, batch)  # hidden [B, L or 1, D]
            mean_loss = loss_total / tokens.clamp_min(1)
            optimizer.zero_grad(set_to_none=True)
            mean_loss.backward()
            if cfg.grad_clip:  # None or 0: no clipping
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if after_step is not None:
                after_step()
            if average is not None:
                average.update()
            step += 1
            loss_sum += float(mean_loss.detach())
            loss_steps += 1
            tokens_seen += int(tokens)
            elapsed = time.perf_counter() - started
            bar.update(step, loss_sum / loss_steps, tokens_seen / max(elapsed, 1e-9))
            out_of_time = time.perf_counter() - started > budget
            if step % eval_every == 0 or step == total_steps or out_of_time:
                with averaged(average):
                    metrics = validate()
                    value = metrics[select_key]
                    weights = copy.deepcopy(model.state_dict()) if value > best_value else None
                model.train()
                history.append(
                    {
                        "step": step,
                        "epoch": round(step / steps_per_epoch, 3),
                        "elapsed_s": round(time.perf_counter() - started, 2),
                        "train_loss": round(loss_sum / max(loss_steps, 1), 5),
                        **{f"valid/{k}": v for k, v in metrics.items()},
                    }
                )
                loss_sum, loss_steps = 0.0, 0
                if value > best_value:
                    best_value, best_step, since_best = value, step, 0
                    best_metrics, best_weights = metrics, weights
                else:
                    since_best += 1
                say(
                    f"step {step}: valid {select_key} {value:.4f} "
                    f"(best {best_value:.4f} at step {best_step})"
                )
                if since_best >= cfg.patience:
                    stopped_by = "early_stopping"
            if out_of_time and stopped_by != "early_stopping":
                stopped_by = "max_minutes"
            if stopped_by in ("early_stopping", "max_minutes") or step >= total_steps:
                break
        epoch += 1
        if stopped_by in ("early_stopping", "max_minutes"):
            break
    bar.close()
    if best_weights is not None:
        model.load_state_dict(best_weights)
    model.eval()
    return FitResult(
        steps=step,
        epochs=step / max(steps_per_epoch, 1),
        seconds=time.perf_counter() - started,
        best_step=best_step,
        best_metrics=best_metrics,
        stopped_by=stopped_by,
        history=history,
    )
