"""Fine-tuning an existing model with the one training loop: after pruning, and distillation.

:func:`fit` is :func:`recloop.train.loop.run` in its start-from-model mode, with the trainer's
own pieces: the same training windows and loader, the same losses (the next-item loss of
``cfg.loss`` unless a loss hook is given, e.g. distillation's), the same AdamW groups and
learning-rate schedule, the same validation to keep the best weights and stop early. Single
process, on the model's device, without bf16; no checkpoints (a fine-tune is
minutes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from recloop.config import TrainConfig
from recloop.data.batches import TrainingWindows, make_loader
from recloop.data.dataset import SequenceDataset
from recloop.data.splits import EvalExamples, Split
from recloop.evaluate import EvalConfig, evaluate
from recloop.models.base import SequentialEncoder
from recloop.train.distributed import DistContext
from recloop.train.loop import (
    LoopPlan,
    LossFn,
    TrainState,
    check_samples,
    keep_starting_weights,
    next_item,
    run,
    validation_eval_config,
    validation_metric_prefix,
    window_config,
)
from recloop.train.progress import Progress


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
    step (magnitude pruning re-applies its masks there; the weight average moves after it, so
    masked weights stay zero in it). With `evaluate_start` the starting weights are evaluated
    first and kept if nothing beats them.
    """
    torch.manual_seed(cfg.seed)
    check_samples(model, cfg)
    split = dataset.leave_one_out()
    loader = _loader(split, cfg)
    device = next(model.parameters()).device
    plan = LoopPlan(
        cfg,
        steps_per_epoch=len(loader),
        context=DistContext(rank=0, world_size=1, local_rank=0, device=device),
        loss=loss or next_item(cfg, dataset.num_items),
        validate=_validation(model, split, cfg),
        after_step=after_step,
        use_runtime=False,
        rate_columns=False,  # compressed versions' manifests record the rows as they always did
    )
    state = TrainState.start(model, cfg, plan.total_steps)
    progress = Progress(
        plan.total_steps, 0, enabled=show_progress, label=description, prefix=f"{description}: "
    )
    if evaluate_start:
        value = keep_starting_weights(state, plan)
        progress.log(f"start: valid {plan.select_key} {value:.4f}")
    started = time.perf_counter()
    run(state, loader, plan, progress)
    if state.best_weights is not None:
        model.load_state_dict(state.best_weights)
    model.eval()
    return FitResult(
        steps=state.step,
        epochs=state.step / max(plan.steps_per_epoch, 1),
        seconds=time.perf_counter() - started,
        best_step=state.best_step,
        best_metrics=state.best_metrics,
        stopped_by=state.stopped_by,
        history=state.history,
    )


def _loader(split: Split, cfg: TrainConfig) -> Any:
    """One process's loader over the training windows (a batch at most as large as them)."""
    windows = TrainingWindows(split.train, window_config(cfg))
    return make_loader(
        windows,
        min(cfg.batch_size, len(windows)),
        seed=cfg.seed,
        drop_last=True,
        bucket_by_length=cfg.bucket_by_length,
    )


def _validation(
    model: SequentialEncoder, split: Split, cfg: TrainConfig
) -> Callable[[], dict[str, float]]:
    """The trainer's validation: same protocol, seed and metric names."""
    config = validation_eval_config(cfg)
    prefix = validation_metric_prefix(cfg)

    def validate() -> dict[str, float]:
        metrics = evaluate(model, split.valid, split.source, config)
        return {prefix + k: v for k, v in metrics.items() if isinstance(v, float)}

    return validate
