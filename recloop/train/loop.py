"""The one training loop: batches in, optimizer steps, periodic validation, the best weights kept.

Single process:
    recloop train --config configs/beauty/sasrec.toml --data data/beauty --registry registry
Data-parallel (gloo on CPU, NCCL on GPU), same arguments, same global batch:
    torchrun --nproc_per_node=2 -m recloop.cli train --config ... --data ... --registry ...

Who runs it: `recloop train` (:func:`recloop.train.trainer.train`: config -> state -> loop ->
publish), the fine-tune after pruning and distillation (:func:`recloop.compress.finetune.fit`,
which starts from an existing model and plugs in its own loss); the online learner takes its
steps with :func:`optimizer_step`, the loop's own step.

Read :func:`run` top to bottom: per batch, trim the padding and move it to the device, compute
the loss (the :data:`LossFn` hook: next-item loss, or a distillation loss), take one
:func:`optimizer_step`; every `eval_every` steps validate the weight average (when kept) and keep
the best weights, stopping after `patience` evaluations without improvement, at `max_steps` /
`max_epochs`, or out of `max_minutes`. Everything that changes lives in one :class:`TrainState`.

Under DDP the loss is summed over a process's tokens and divided by the token count of the whole
global batch, so the averaged DDP gradient equals the one-process gradient; every rank leaves the
loop at the same step (rank 0 decides).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from recloop.config import TrainConfig, ValidationProtocol
from recloop.data.batches import WindowConfig, trim_left_padding
from recloop.errors import ConfigError
from recloop.evaluate import EvalConfig
from recloop.models.base import SequentialEncoder
from recloop.train.averaging import WeightAverage, averaged, weight_average
from recloop.train.distributed import DistContext, agree, all_reduce_sum
from recloop.train.losses import Negatives, next_item_loss
from recloop.train.progress import Progress

Batch = dict[str, torch.Tensor]
# (model, hidden [B, L or 1, D], batch) -> (loss summed over the batch's tokens, token count)
LossFn = Callable[[SequentialEncoder, torch.Tensor, Batch], tuple[torch.Tensor, torch.Tensor]]

# Seeds the validation split's sampled negatives. `recloop eval` draws the test split's with
# seed 0, keyed by the same example positions: a different seed keeps checkpoint selection from
# ever seeing the negatives that the test ranks against.
VALID_NEGATIVES_SEED = 1


# --------------------------------------------------------------------------- the state


@dataclass(frozen=True)
class LrSchedule:
    """Linear warm-up, then constant, cosine or linear decay to lr * min_lr_ratio."""

    cfg: TrainConfig
    total_steps: int

    def __call__(self, step: int) -> float:
        return lr_at(self.cfg, step, self.total_steps)


@dataclass
class TrainState:
    """Everything the loop changes; a checkpoint carries all of it but the running counters."""

    model: SequentialEncoder
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    average: WeightAverage | None  # validated, kept and published instead of the raw weights
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` done: a resumed run skips them
    best_value: float = -math.inf  # of the select metric
    best_step: int = 0  # 0: nothing beat the starting weights (or nothing was evaluated)
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_weights: dict[str, torch.Tensor] | None = None
    evals_since_best: int = 0  # the patience counter
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per evaluation
    stopped_by: str = ""  # max_steps | max_epochs | max_minutes | early_stopping | interrupted
    # Running counters of this process's run (not checkpointed).
    tokens_seen: int = 0
    train_seconds: float = 0.0
    loss_sum: float = 0.0  # since the last evaluation
    loss_steps: int = 0

    @classmethod
    def start(
        cls, model: SequentialEncoder, cfg: TrainConfig, total_steps: int, *, fused: bool = False
    ) -> TrainState:
        """A fresh state for `model`: a new one, or an existing one to fine-tune."""
        return cls(
            model=model,
            optimizer=adamw(model, cfg, fused=fused),
            schedule=LrSchedule(cfg, total_steps),
            average=weight_average(model, cfg.ema_decay),
        )

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / max(self.train_seconds, 1e-9)


@dataclass(frozen=True)
class LoopPlan:
    """What the loop does, fixed before its first step."""

    cfg: TrainConfig
    steps_per_epoch: int
    context: DistContext
    loss: LossFn
    validate: Callable[[], dict[str, float]]  # metrics named with the select key's prefix
    forward: torch.nn.Module | None = None  # the model wrapped by DDP, if it is
    # Before each forward pass: may add entries to the batch (a sharded table looks up the
    # step's rows there and adds the negatives it drew; see recloop.train.sharding).
    before_forward: Callable[[TrainState, Batch], Batch] | None = None
    # Tensors kept with the best weights besides the model's state dict (a sharded table's
    # own shards, which the model's state dict does not hold), under "sharded/" names.
    keep_with_best: Callable[[], dict[str, torch.Tensor]] | None = None
    after_step: Callable[[], None] | None = None  # after each step, before the average moves
    on_best: Callable[[TrainState], None] | None = None  # after each improvement (rank 0 saves)
    stop_at_step: int | None = None  # stop there as "interrupted" (tests of resuming)
    use_runtime: bool = True  # honour train.bf16 (False: a plain CPU fine-tune)
    rate_columns: bool = True  # history rows carry lr and tokens_per_s (the trainer's CSV)

    @property
    def total_steps(self) -> int:
        return self.cfg.max_steps or self.cfg.max_epochs * self.steps_per_epoch

    @property
    def eval_every(self) -> int:
        return self.cfg.eval_every_steps or self.cfg.eval_every_epochs * self.steps_per_epoch

    @property
    def select_key(self) -> str:
        return validation_metric_prefix(self.cfg) + self.cfg.select_metric


# --------------------------------------------------------------------------- the loop


def run(state: TrainState, loader: Any, plan: LoopPlan, progress: Progress) -> TrainState:
    """Trains until a stop condition; leaves the model with its *last* weights in train mode
    (the caller loads ``state.best_weights``, after saving a checkpoint if it keeps one)."""
    cfg, ctx = plan.cfg, plan.context
    started = time.perf_counter()
    budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    state.stopped_by = "max_steps" if cfg.max_steps else "max_epochs"
    state.model.train()
    stop = False
    while state.step < plan.total_steps and not stop:
        loader.sampler.set_epoch(state.epoch)
        for index, batch in enumerate(loader):
            if index < state.batch_in_epoch:  # resuming mid-epoch: same order, skip what was done
                continue
            tick = time.perf_counter()
            tokens, loss = train_step(state, plan, prepare_batch(batch, plan))
            state.step += 1
            state.batch_in_epoch = index + 1
            state.train_seconds += time.perf_counter() - tick
            state.tokens_seen += tokens
            state.loss_sum += loss  # rank 0's share, scaled to the global mean
            state.loss_steps += 1
            progress.update(state.step, state.loss_sum / state.loss_steps, state.tokens_per_second)

            out_of_time = time.perf_counter() - started > budget
            if state.step % plan.eval_every == 0 or state.step == plan.total_steps or out_of_time:
                value = evaluate_and_keep_best(state, plan, elapsed=time.perf_counter() - started)
                progress.log(
                    f"step {state.step}: valid {plan.select_key} {value:.4f} "
                    f"(best {state.best_value:.4f} at step {state.best_step})"
                )
            if out_of_time and state.stopped_by != "early_stopping":
                state.stopped_by = "max_minutes"
            if plan.stop_at_step is not None and state.step >= plan.stop_at_step:
                state.stopped_by = "interrupted"
            finished = state.stopped_by in ("early_stopping", "max_minutes", "interrupted")
            stop = agree(finished, ctx)  # every rank must leave the loop at the same step
            if stop or state.step >= plan.total_steps:
                break
        if state.batch_in_epoch >= plan.steps_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    progress.close()
    return state


def prepare_batch(batch: Batch, plan: LoopPlan) -> Batch:
    """Left padding trimmed, tensors on the device, and with `samples = "prefixes"` one target
    per window, at its end (the rest is never scored)."""
    cfg = plan.cfg
    if cfg.trim_padding:
        batch = trim_left_padding(batch)
    device = plan.context.device
    moved = {
        "input_ids": batch["input_ids"].to(device, non_blocking=True),  # [B, L]
        "target_ids": batch["target_ids"].to(device, non_blocking=True),  # [B, L]
        "timestamps": batch["timestamps"].to(device, non_blocking=True),  # [B, L]
    }
    if cfg.samples == "prefixes":
        moved["target_ids"] = moved["target_ids"][:, -1:]  # [B, 1]
    return moved


def train_step(state: TrainState, plan: LoopPlan, batch: Batch) -> tuple[int, float]:
    """Forward and loss on one (prepared) batch, then :func:`optimizer_step`; returns (tokens of
    the global batch, this rank's loss scaled to the global mean)."""
    cfg, ctx = plan.cfg, plan.context
    forward = plan.forward or state.model
    use_bf16 = cfg.bf16 and plan.use_runtime
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    last_only = cfg.samples == "prefixes"
    if plan.before_forward is not None:
        batch = plan.before_forward(state, batch)
    with autocast:
        hidden = forward(batch["input_ids"], batch["timestamps"], last_only=last_only)
        loss_total, tokens = plan.loss(state.model, hidden, batch)  # hidden [B, L or 1, D]
    global_tokens = all_reduce_sum(tokens.detach().clone().float(), ctx)
    # DDP averages gradients over ranks; scaling by world / global tokens makes that average
    # the mean over every token of the global batch.
    loss = loss_total * ctx.world_size / global_tokens.clamp_min(1.0)
    optimizer_step(
        state.model,
        [state.optimizer],
        [loss],
        grad_clip=cfg.grad_clip,
        lr=state.schedule(state.step),
        after_step=plan.after_step,
        average=state.average,
    )
    return int(global_tokens.item()), float(loss.item())


def optimizer_step(
    model: torch.nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    losses: Iterable[torch.Tensor],
    *,
    grad_clip: float | None,
    lr: float | None = None,
    before_step: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
    average: WeightAverage | None = None,
) -> None:
    """One step: gradients of every loss in `losses` (a generator may run each chunk's forward
    lazily, so chunks accumulate one graph at a time) -> clip the norm -> the schedule's `lr`
    -> every optimizer steps -> `after_step` -> the weight average moves.

    `before_step` edits gradients after clipping (the online learner zeroes the padding row's).
    """
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    for loss in losses:
        loss.backward()  # type: ignore[no-untyped-call]
    if grad_clip:  # None or 0: no clipping
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if before_step is not None:
        before_step()
    for optimizer in optimizers:
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        optimizer.step()
    if after_step is not None:
        after_step()
    if average is not None:
        average.update()


def evaluate_and_keep_best(state: TrainState, plan: LoopPlan, *, elapsed: float) -> float:
    """Validates the weights the run would keep (the average's, when there is one), appends a
    history row, and keeps the weights when the select metric improved (patience otherwise).
    Returns the select metric's value."""
    with averaged(state.average):  # the weights validated are the ones kept
        metrics = plan.validate()
        value = float(metrics[plan.select_key])
        weights = copy.deepcopy(state.model.state_dict()) if value > state.best_value else None
        if weights is not None and plan.keep_with_best is not None:
            weights.update(plan.keep_with_best())
    state.model.train()
    row: dict[str, Any] = {
        "step": state.step,
        "epoch": round(state.step / plan.steps_per_epoch, 3),
        "elapsed_s": round(elapsed, 2),
        "train_loss": round(state.loss_sum / max(state.loss_steps, 1), 5),
    }
    if plan.rate_columns:
        row["lr"] = state.optimizer.param_groups[0]["lr"]
        row["tokens_per_s"] = round(state.tokens_per_second)
    row.update({f"valid/{k}": v for k, v in metrics.items()})
    state.history.append(row)
    state.loss_sum, state.loss_steps = 0.0, 0
    if weights is not None:  # improved
        state.best_value, state.best_step, state.evals_since_best = value, state.step, 0
        state.best_metrics, state.best_weights = metrics, weights
        if plan.on_best is not None:
            plan.on_best(state)
    else:
        state.evals_since_best += 1
    if state.evals_since_best >= plan.cfg.patience:
        state.stopped_by = "early_stopping"
    return value


def keep_starting_weights(state: TrainState, plan: LoopPlan) -> float:
    """Start-from-model mode: validates the model as it is, before any step, and keeps it as
    the best so far (a fine-tune that never beats it ends with it). Returns the value."""
    metrics = plan.validate()
    state.best_metrics = metrics
    state.best_value = metrics[plan.select_key]
    state.best_weights = copy.deepcopy(state.model.state_dict())
    state.history.append({"step": 0, **{f"valid/{k}": v for k, v in metrics.items()}})
    return state.best_value


# --------------------------------------------------------------------------- pieces


def next_item(cfg: TrainConfig, num_items: int) -> LossFn:
    """The default loss hook: `train.loss` on the next item of every scored position."""

    def loss(
        model: SequentialEncoder, hidden: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        targets = batch["target_ids"]  # [B, L or 1]
        negatives = None
        if "negative_ids" in batch:  # drawn before the forward (a sharded table's step)
            negatives = Negatives(
                batch["negative_ids"], batch["negative_log_q"], batch["target_log_q"]
            )
        return next_item_loss(
            model, hidden, targets, cfg, num_items, inputs=batch["input_ids"], negatives=negatives
        )

    return loss


def adamw(model: torch.nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
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
    return eval_config(cfg, cfg.eval_protocol)


def eval_config(cfg: TrainConfig, protocol: ValidationProtocol) -> EvalConfig:
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
