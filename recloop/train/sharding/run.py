"""What a sharded table adds to `recloop train`: the model built around it, the step's lookup,
the best weights, the rank-local checkpoint files and the publish of one file per shard.

Every method marked *collective* must be called by every rank, in the same order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from recloop.config import TrainConfig
from recloop.errors import ConfigError
from recloop.models.base import SequentialEncoder
from recloop.models.factory import build_model
from recloop.train.checkpoint import restore_rng, rng_state
from recloop.train.distributed import DistContext
from recloop.train.sharding.embedding import ShardedModel
from recloop.train.sharding.spec import ShardingPlan
from recloop.train.sharding.table import ShardedItemTable

BEST_PREFIX = "sharded/"
_OPTIMIZER_PREFIX = "optimizer/"


def build_sharded_model(
    model_type: str, model_config: dict[str, Any], cfg: TrainConfig, ctx: DistContext
) -> ShardedTraining:
    """The model with its item table sharded. The dense part is built with a one-item table
    (so the [num_items + 1, dim] table is never allocated whole), then told the real size."""
    num_items = int(model_config["num_items"])
    model = build_model(model_type, {**model_config, "num_items": 1}).to(ctx.device)
    model.config = dataclasses.replace(model.config, num_items=num_items)
    table = ShardedItemTable(
        num_items + 1, model.config.dim, cfg, ctx, init_std=model.config.init_std
    )
    return ShardedTraining(ShardedModel(model, table, num_items), cfg, ctx)


class ShardedTraining:
    """A training run's sharded model and the hooks the loop and the trainer call."""

    def __init__(self, sharded: ShardedModel, cfg: TrainConfig, ctx: DistContext) -> None:
        self.sharded, self.cfg, self.context = sharded, cfg, ctx
        self.model: SequentialEncoder = sharded.model
        self.table: ShardedItemTable = sharded.table

    @property
    def plan(self) -> ShardingPlan:
        return self.table.plan

    # ------------------------------------------------------------------ the loop's hooks

    def before_forward(self, state: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Collective. The table's lr follows the dense schedule; the step's rows are bound."""
        self.table.set_lr(self.cfg.sparse_lr * state.schedule(state.step) / self.cfg.lr)
        negatives = self.sharded.bind_step(batch["input_ids"], batch["target_ids"], self.cfg)
        if negatives is None:
            return batch
        return {
            **batch,
            "negative_ids": negatives.ids,
            "negative_log_q": negatives.log_q,
            "target_log_q": negatives.pos_log_q,
        }

    def keep_with_best(self) -> dict[str, torch.Tensor]:
        return {BEST_PREFIX + k: v for k, v in self.table.snapshot().items()}

    def restore_best(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Puts the kept shards back into the table; returns the dense rest."""
        shards = {k[len(BEST_PREFIX) :]: v for k, v in weights.items() if k.startswith(BEST_PREFIX)}
        self.table.restore_weights(shards)
        return {k: v for k, v in weights.items() if not k.startswith(BEST_PREFIX)}

    @contextmanager
    def whole_table(self) -> Iterator[None]:
        """Collective: evaluation scores against the gathered table."""
        with self.sharded.whole_table():
            yield

    # ------------------------------------------------------------------ run files

    def save_best(self, run_dir: Path, weights: dict[str, torch.Tensor]) -> None:
        """This rank's kept shards beside rank 0's best.safetensors."""
        shards = {k: v.contiguous() for k, v in weights.items() if k.startswith(BEST_PREFIX)}
        _save_atomic(shards, run_dir / f"best-table-rank{self.context.rank:05d}.safetensors")

    def load_best(self, run_dir: Path) -> dict[str, torch.Tensor]:
        path = run_dir / f"best-table-rank{self.context.rank:05d}.safetensors"
        return load_file(str(path)) if path.is_file() else {}

    def save_checkpoint(self, run_dir: Path, step: int) -> dict[str, Any]:
        """Collective. Writes this rank's shards, optimizer state and RNG for `step`; returns
        the entry rank 0 records in the checkpoint's state.json (written after this)."""
        directory = run_dir / "checkpoints" / f"table-step-{step:09d}"
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.table.local_weights().items()}
        tensors.update(
            {_OPTIMIZER_PREFIX + k: v.contiguous() for k, v in self.table.optimizer_state().items()}
        )
        tensors.update({f"rng/{k}": v for k, v in rng_state().items()})
        _save_atomic(tensors, directory / f"rank{self.context.rank:05d}.safetensors")
        _barrier(self.context)
        return {"directory": directory.name, "plan": self.plan.to_json()}

    def load_checkpoint(self, checkpoint_dir: Path, entry: dict[str, Any] | None) -> None:
        """Restores this rank's part of a checkpoint; a checkpoint of another plan or world
        size is a ConfigError before any step."""
        if entry is None:
            raise ConfigError(f"{checkpoint_dir}: not a sharded checkpoint (train.sharding = none)")
        saved = ShardingPlan.from_json(entry["plan"])
        if saved != self.plan:
            raise ConfigError(
                f"{checkpoint_dir}: written by {saved.world_size} process(es) with "
                f"{saved.sharding_type} sharding of a [{saved.num_rows}, {saved.dim}] table; this "
                f"run has {self.plan.world_size} with {self.plan.sharding_type} of "
                f"[{self.plan.num_rows}, {self.plan.dim}]: resume with the same processes and "
                "train.sharding"
            )
        path = (
            checkpoint_dir.parent / entry["directory"] / f"rank{self.context.rank:05d}.safetensors"
        )
        if not path.is_file():
            raise ConfigError(f"{checkpoint_dir}: this rank's table file {path.name} is missing")
        tensors = load_file(str(path))
        optimizer = {
            k[len(_OPTIMIZER_PREFIX) :]: v
            for k, v in tensors.items()
            if k.startswith(_OPTIMIZER_PREFIX)
        }
        weights = {k: v for k, v in tensors.items() if k.startswith("shard.")}
        self.table.restore_weights(weights)
        self.table.restore_optimizer(optimizer)
        restore_rng({k[len("rng/") :]: v for k, v in tensors.items() if k.startswith("rng/")})

    def write_publish_shards(self, run_dir: Path) -> list[Path]:
        """Collective. Writes this rank's shards for the registry; returns every shard's
        file in plan order (rank 0 publishes them)."""
        from recloop.registry.sharded import write_shard

        directory = run_dir / "publish"
        directory.mkdir(parents=True, exist_ok=True)
        files = [directory / f"shard-{i:05d}.safetensors" for i in range(len(self.plan.shards))]
        mine = iter(self.table.local)
        for index, shard in enumerate(self.plan.shards):
            if shard.rank == self.context.rank:
                write_shard(files[index], next(mine).weight.detach())
        _barrier(self.context)
        return files

    def describe(self) -> dict[str, Any]:
        """The manifest's record of how the run was sharded."""
        return {
            **self.plan.to_json(),
            "sparse_optimizer": self.cfg.sparse_optimizer,
            "sparse_lr": self.cfg.sparse_lr,
        }


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def _barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
