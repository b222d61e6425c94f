"""The item table sharded over the processes with TorchRec.

One `EmbeddingCollection` table of [num_items + 1, dim] rows (row 0 is padding, never looked
up), sharded by `DistributedModelParallel` with the planner constrained to the configured
sharding type. Its optimizer is fused into the backward kernel (fbgemm's TBE): a lookup's
gradient updates the rows it touched, there and then, with per-row optimizer state; no
[rows, dim] gradient ever exists, which is what lets the table outgrow one process.

Every lookup is a collective (an all-to-all on the table's own process group, separate from
the one DDP all-reduces the encoder's gradients on, so the two never interleave): every rank
calls :meth:`ShardedItemTable.lookup` the same number of times, each with its own ids.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recloop.config import TrainConfig
from recloop.errors import ConfigError
from recloop.train.distributed import DistContext
from recloop.train.sharding.spec import (
    FEATURE_NAME,
    TABLE_NAME,
    ShardingPlan,
    TableShard,
    check_sharding,
)

_WEIGHT_KEY = f"ec.embeddings.{TABLE_NAME}.weight"
# Rows per block of the seeded initialisation: a row's initial value depends on the seed and
# its block only, so 1, 2 or 4 processes start from the same table.
_INIT_BLOCK = 1 << 16
# Rows per lookup when the whole table is gathered (evaluation, publishing to one process).
_GATHER_CHUNK = 1 << 18

# (row_start, row_end, col_start, col_end) -> that block of a stored table, for loading.
RowReader = Callable[[int, int, int, int], torch.Tensor]


class _TableHolder(nn.Module):
    """DistributedModelParallel shards the child modules of what it wraps."""

    def __init__(self, num_rows: int, dim: int) -> None:
        super().__init__()
        from torchrec import EmbeddingCollection, EmbeddingConfig

        config = EmbeddingConfig(
            name=TABLE_NAME,
            embedding_dim=dim,
            num_embeddings=num_rows,
            feature_names=[FEATURE_NAME],
        )
        # "meta": nothing is allocated until the sharded module places each shard.
        self.ec = EmbeddingCollection(tables=[config], device=torch.device("meta"))

    def forward(self, features: Any) -> Any:
        return self.ec(features)


@dataclass
class LocalShard:
    """A shard this rank holds: where it sits in the table, and a view of its rows."""

    shard: TableShard
    weight: torch.Tensor  # [rows, cols], a view into the fused table: writes are live


class ShardedItemTable:
    """[num_rows, dim] item rows sharded over `ctx`'s processes, trained by a fused optimizer."""

    def __init__(
        self,
        num_rows: int,
        dim: int,
        cfg: TrainConfig,
        ctx: DistContext,
        *,
        init_std: float,
    ) -> None:
        check_sharding(cfg, num_rows - 1, ctx.device.type)
        self.num_rows, self.dim = num_rows, dim
        self.sharding_type = cfg.sharding
        self.context = ctx
        self.group = _table_group(ctx)
        try:
            self._dmp, self.plan = _shard(num_rows, dim, cfg, ctx, self.group)
        except BaseException:
            if not ctx.distributed:
                self.close()  # a refused plan leaves no process group of its own behind
            raise
        self.local = self._local_shards()
        self.initialise(cfg.seed, init_std)
        self.set_lr(cfg.sparse_lr)

    # ------------------------------------------------------------------ training

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows [N, dim] of item ids [N] (collective). Differentiable: the backward pass
        updates the touched rows with the fused optimizer."""
        from torchrec import KeyedJaggedTensor

        ids = ids.reshape(-1).to(self.context.device, torch.long)
        features = KeyedJaggedTensor(
            keys=[FEATURE_NAME],
            values=ids,
            lengths=torch.tensor([ids.numel()], dtype=torch.int32, device=ids.device),
        )
        rows: torch.Tensor = self._dmp(features)[FEATURE_NAME].values()
        return rows

    @torch.no_grad()
    def decay_optimizer_state(self, factor: float) -> None:
        """Multiplies the row-wise Adagrad state by `factor` (< 1) before the next update:
        state = factor x state + mean(g^2) is RMSprop's running average (up to its scale), so
        the steps of rows learned at every step do not shrink as 1/sqrt(t) over a stream that
        never ends (fbgemm's CPU kernels have no Adam or RMSprop)."""
        for state in self.optimizer_state().values():
            state.mul_(factor)

    def set_lr(self, lr: float) -> None:
        for group in self._dmp.fused_optimizer.param_groups:
            group["lr"] = lr

    # ------------------------------------------------------------------ whole table

    @torch.no_grad()
    def gather(self, rows: int | None = None) -> torch.Tensor:
        """The table's first `rows` rows (all by default) on every rank (collective; row 0
        zero): a table with headroom for new items gathers only the rows in use."""
        end = self.num_rows if rows is None else min(rows, self.num_rows)
        parts = [
            self.lookup(torch.arange(start, min(start + _GATHER_CHUNK, end)))
            for start in range(0, end, _GATHER_CHUNK)
        ]
        table = torch.cat(parts).float()
        table[0].zero_()
        return table

    @torch.no_grad()
    def initialise(self, seed: int, std: float) -> None:
        """N(0, std) rows (row 0 zero) that depend on `seed` only, not on the world size."""
        for local in self.local:
            _fill_seeded_rows(local.weight, local.shard, self.dim, seed, std)

    @torch.no_grad()
    def load(self, read: RowReader) -> None:
        """Fills this rank's shards from a stored table of any sharding (resharding on load)."""
        for local in self.local:
            s = local.shard
            block = read(s.row_offset, s.row_offset + s.rows, s.col_offset, s.col_offset + s.cols)
            if tuple(block.shape) != (s.rows, s.cols):
                raise ConfigError(
                    f"sharded table: the stored block for shard {s.to_json()} has shape "
                    f"{list(block.shape)}"
                )
            local.weight.copy_(block)
        for local in self.local:  # padding stays zero whatever was stored
            if local.shard.row_offset == 0:
                local.weight[0].zero_()

    @torch.no_grad()
    def write_row(self, row_id: int, values: torch.Tensor) -> None:
        """Sets one row (a new item's initial row) in whichever local shard holds it; a no-op
        on the ranks that do not hold it (every rank calls it, only the owner writes)."""
        if not 0 < row_id < self.num_rows:
            raise ConfigError(
                f"sharded table: row {row_id} is outside its {self.num_rows:,} rows (raise the "
                "table's capacity)"
            )
        for local in self.local:
            s = local.shard
            if s.row_offset <= row_id < s.row_offset + s.rows:
                local.weight[row_id - s.row_offset] = values[s.col_offset : s.col_offset + s.cols]

    def row_blocks(self) -> list[tuple[int, torch.Tensor]]:
        """(first row id, rows) of each local shard; row-wise sharding only (each shard holds
        whole rows), which is what changed-row publishing needs."""
        if any(local.shard.cols != self.dim for local in self.local):
            raise ConfigError("sharded table: whole rows per shard need train.sharding = row_wise")
        return [(local.shard.row_offset, local.weight) for local in self.local]

    # ------------------------------------------------------------------ state

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """This rank's fused optimizer state, by name (momentum of row-wise Adagrad: one value
        per row of each shard), as views: copying into them restores the state."""
        state = self._dmp.fused_optimizer.state_dict()["state"]
        found: dict[str, torch.Tensor] = {}
        for param_state in state.values():
            for name, value in param_state.items():
                for index, shard in enumerate(_local_tensors(value)):
                    found[f"{name}.{index}"] = shard
        return found

    def local_weights(self) -> dict[str, torch.Tensor]:
        """This rank's shards by name (views)."""
        return {f"shard.{i}": local.weight for i, local in enumerate(self.local)}

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of this rank's shards (the best weights so far)."""
        return {name: t.detach().clone() for name, t in self.local_weights().items()}

    @torch.no_grad()
    def restore_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copies saved shards (named as :meth:`local_weights` names them) back in place."""
        for name, target in self.local_weights().items():
            target.copy_(_required(weights, name, "shard"))

    @torch.no_grad()
    def restore_optimizer(self, state: dict[str, torch.Tensor]) -> None:
        """Copies saved fused optimizer state (as :meth:`optimizer_state` names it) back."""
        for name, target in self.optimizer_state().items():
            target.copy_(_required(state, name, "optimizer state"))

    def _local_shards(self) -> list[LocalShard]:
        weight = self._dmp.state_dict()[_WEIGHT_KEY]
        local = []
        for piece in weight.local_shards():
            offsets, sizes = piece.metadata.shard_offsets, piece.metadata.shard_sizes
            shard = TableShard(self.context.rank, offsets[0], offsets[1], sizes[0], sizes[1])
            local.append(LocalShard(shard, piece.tensor))
        return local

    def close(self) -> None:
        """Leaves the table's process group: a single process destroys the one it created;
        several wait for each other first, so none tears down gloo's connections while
        another still uses them (a process exiting mid-teardown can abort)."""
        if not dist.is_initialized():
            return
        if not self.context.distributed:
            dist.destroy_process_group()
            return
        dist.barrier(group=self.group)
        dist.destroy_process_group(self.group)


def _required(saved: dict[str, torch.Tensor], name: str, what: str) -> torch.Tensor:
    if name not in saved:
        raise ConfigError(f"sharded table: the saved state has no {what} {name!r}")
    return saved[name]


def _local_tensors(value: Any) -> Iterator[torch.Tensor]:
    if hasattr(value, "local_shards"):
        for piece in value.local_shards():
            yield piece.tensor
    elif isinstance(value, torch.Tensor):
        yield value


def _fill_seeded_rows(
    target: torch.Tensor, shard: TableShard, dim: int, seed: int, std: float
) -> None:
    """Writes N(0, std) rows into `target` (the shard's view), one block of rows at a time, so
    the peak is one block, not a second copy of the shard."""
    first = shard.row_offset // _INIT_BLOCK
    last = (shard.row_offset + shard.rows - 1) // _INIT_BLOCK
    for block in range(first, last + 1):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
        rows = torch.randn(_INIT_BLOCK, dim, generator=generator).mul_(std)
        start = max(block * _INIT_BLOCK, shard.row_offset)
        end = min((block + 1) * _INIT_BLOCK, shard.row_offset + shard.rows)
        target[start - shard.row_offset : end - shard.row_offset] = rows[
            start - block * _INIT_BLOCK : end - block * _INIT_BLOCK,
            shard.col_offset : shard.col_offset + shard.cols,
        ]
    if shard.row_offset == 0:
        target[0].zero_()


def _table_group(ctx: DistContext) -> Any:
    """The table's own process group; a single process gets a one-rank group of its own."""
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if ctx.distributed:
            raise ConfigError("a sharded table needs the process group joined first")
        store = dist.HashStore()  # type: ignore[attr-defined]
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
        return dist.group.WORLD
    return dist.new_group(backend=backend)


def _shard(
    num_rows: int, dim: int, cfg: TrainConfig, ctx: DistContext, group: Any
) -> tuple[Any, ShardingPlan]:
    """The table sharded by DistributedModelParallel as the planner proposes, and its plan."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.planner.types import PlannerError
    from torchrec.distributed.types import ShardingEnv

    # The planner logs a page of statistics at INFO for every plan; warnings still show.
    logging.getLogger("torchrec").setLevel(logging.WARNING)
    sharder = EmbeddingCollectionSharder(fused_params=_fused_params(cfg))
    holder = _TableHolder(num_rows, dim)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchRec's planner warns about its own defaults
            plan = _planner(dim, cfg, ctx).collective_plan(holder, [sharder], group)
    except PlannerError as exc:
        raise ConfigError(
            f"train.sharding = {cfg.sharding!r}: no plan fits a [{num_rows:,}, {dim}] table "
            f"on {ctx.world_size} process(es): {str(exc).splitlines()[0]}"
        ) from None
    env = ShardingEnv.from_process_group(group)
    dmp = DistributedModelParallel(
        holder, env=env, plan=plan, sharders=[sharder], device=ctx.device
    )
    weight = dmp.state_dict()[_WEIGHT_KEY]
    shards = tuple(
        TableShard(
            rank=int(meta.placement.rank()),
            row_offset=meta.shard_offsets[0],
            col_offset=meta.shard_offsets[1],
            rows=meta.shard_sizes[0],
            cols=meta.shard_sizes[1],
        )
        for meta in weight.metadata().shards_metadata
    )
    return dmp, ShardingPlan(cfg.sharding, ctx.world_size, num_rows, dim, shards)


def _planner(dim: int, cfg: TrainConfig, ctx: DistContext) -> Any:
    """TorchRec's planner held to the configured sharding type, on this machine's memory."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.storage_reservations import (
        FixedPercentageStorageReservation,
    )
    from torchrec.distributed.planner.types import (
        KernelConfig,
        ParameterConstraints,
        TopologyFactory,
        TrainerConfig,
    )

    world_size = ctx.world_size
    constraints = ParameterConstraints(
        sharding_types=[cfg.sharding],
        # Column-wise: one slice of columns per process (TorchRec's default keeps the
        # whole table in one slice when it fits).
        min_partition=max(1, dim // world_size) if cfg.sharding == "column_wise" else None,
    )
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=world_size,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
            ddr_cap_bytes=_memory_per_process(world_size),
        ),
        kernel_config=KernelConfig(compute_device=ctx.device.type),
    )
    return EmbeddingShardingPlanner(
        topology=topology,
        constraints={TABLE_NAME: constraints},
        storage_reservation=FixedPercentageStorageReservation(0.15),
    )


def _fused_params(cfg: TrainConfig) -> dict[str, Any]:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    optimizer = {
        "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        "adam": EmbOptimType.ADAM,
    }[cfg.sparse_optimizer]
    return {"optimizer": optimizer, "learning_rate": cfg.sparse_lr, "eps": 1e-8}


def _memory_per_process(world_size: int) -> int:
    """This machine's memory shared by the processes on it, so a plan that cannot fit is
    refused by the planner before anything is allocated."""
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return int(pages // max(local, 1))
