"""The online learner under torchrun: the item table sharded, the events' users partitioned.

    torchrun --nproc_per_node=2 -m recloop.cli online --registry registry \\
        --event-log events.db online.sharding='row_wise'

Every process reads the same micro-batches (their end agreed, so a log that grows meanwhile
cannot split them) and applies every event to the user state and the vocabulary, which stay
replicated and identical (admission is deterministic). What is partitioned is the work: a
user belongs to one process (crc32 of the id), which alone scores that user's events and
learns from them, so every event is learned exactly once; the replay sample is split too.
The item table is a row-wise :class:`ShardedItemTable` with capacity for `table_headroom`
admissions, trained by its fused row-wise Adagrad at `table_lr`; the encoder's gradients
are averaged over processes before AdamW steps, so the dense weights stay identical.

Publishing is collective: each process saves its optimizer and RNG state keyed by the offset,
then its changed rows are gathered, and rank 0 alone publishes the delta (with the offset it
covers) and commits the offset. A process killed at any moment takes the others down with it
(torchrun); restarted, they all continue from the newest published version and its offset,
each with the state it saved for that offset, so no event is lost or applied twice.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from recloop.config import TrainConfig
from recloop.errors import ConfigError
from recloop.events import EventLog, LoggedEvent
from recloop.models.factory import config_to_dict
from recloop.online.config import OnlineConfig
from recloop.online.control import crash_point
from recloop.online.learner import TABLE, OnlineLearner, RunSummary, log
from recloop.online.prequential import PrequentialTotals, rank_targets, totals_from_ranks
from recloop.online.resume import state_dir
from recloop.online.steps import Sample, train_step
from recloop.registry import Delta, Registry, RowUpdate, SideFiles, publish_version
from recloop.registry.deltas import diff_state
from recloop.train.distributed import DistContext, agree
from recloop.train.sharding.embedding import ShardedModel
from recloop.train.sharding.spec import FULL_SOFTMAX_MAX_ITEMS
from recloop.train.sharding.table import ShardedItemTable


def owner(user: str, world_size: int) -> int:
    """The process that learns `user`'s events: stable across runs and machines."""
    return zlib.crc32(user.encode("utf-8")) % world_size


class AgreedReads:
    """The event log as every process must see it: each micro-batch ends at the smallest last
    offset any process read, and a stop requested on any process stops them all."""

    def __init__(self, events: EventLog, context: DistContext) -> None:
        self.events, self.context = events, context
        self.stop: threading.Event | None = None

    def read(self, after: int, limit: int) -> list[LoggedEvent]:
        batch = self.events.read(after, limit)
        stopping = self.stop is not None and self.stop.is_set()
        # One all-reduce: the max of -last is the min of the last offsets.
        mine = torch.tensor([-(batch[-1].offset if batch else after), 1 if stopping else 0])
        agreed = _all_reduce(mine, dist.ReduceOp.MAX)
        if int(agreed[1]) and self.stop is not None:
            self.stop.set()
            return []
        return [e for e in batch if e.offset <= -int(agreed[0])]

    def __getattr__(self, name: str) -> Any:  # commit, last_offset, committed, ...
        return getattr(self.events, name)


class ShardedOnlineLearner(OnlineLearner):
    """:class:`OnlineLearner` over N torchrun processes; see the module docstring."""

    def __init__(
        self,
        registry: Registry,
        events: EventLog,
        config: OnlineConfig,
        run_dir: Path,
        *,
        context: DistContext,
        start: str = "latest",
        data: Path | None = None,
        attributes: Path | None = None,
    ) -> None:
        if config.sharding != "row_wise":
            raise ConfigError(
                "the online learner under torchrun needs online.sharding = 'row_wise'"
            )
        self.context = context
        self.reads = AgreedReads(events, context)
        # Rank 0 keeps the run directory; the others their own (state files, logs).
        own_dir = Path(run_dir) if context.is_main else Path(run_dir) / f"rank-{context.rank:05d}"
        reads: Any = self.reads  # an EventLog in all but name: reads agreed, the rest passed on
        super().__init__(
            registry, reads, config, own_dir, start=start, data=data, attributes=attributes
        )

    # ------------------------------------------------------------------ set-up (hooks)

    def _build_optimizers(self) -> None:
        """The sharded table (loaded from the starting version's rows) instead of the model's
        own, and AdamW on the dense weights; each process draws its replay from its own RNG."""
        ctx, config = self.context, self.config
        self._rng = np.random.default_rng([config.seed, ctx.rank])
        weight = self.model.item_embedding.weight.detach()
        if weight.shape[0] - 1 > FULL_SOFTMAX_MAX_ITEMS:
            raise ConfigError(
                f"the sharded online learner looks up the whole table every step; "
                f"{weight.shape[0] - 1:,} items is above {FULL_SOFTMAX_MAX_ITEMS:,}"
            )
        table_config = TrainConfig(
            sharding="row_wise",
            loss="sampled_softmax",
            sparse_lr=config.table_lr,
            seed=config.seed,
        )
        capacity = weight.shape[0] + config.table_headroom
        table = ShardedItemTable(
            capacity, weight.shape[1], table_config, ctx, init_std=self.model.config.init_std
        )
        table.load(_padded_reader(weight))
        self.sharded = ShardedModel(self.model, table, self.vocabulary.num_items)
        dense = list(self.model.parameters())  # the model holds no table any more
        for param in dense:
            param.requires_grad_(config.train_dense)
        self.dense_optimizer = torch.optim.AdamW(
            dense, lr=config.lr, betas=(0.9, 0.98), weight_decay=0.0
        )
        self._published = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._published_rows = [(start, rows.clone()) for start, rows in table.row_blocks()]

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"dense": self.dense_optimizer}

    def _table_state_file(self, offset: int) -> Path:
        return self.run_dir / "state" / f"table-offset-{offset:012d}.safetensors"

    def _save_learner_state(self, offset: int) -> None:
        # The table's optimizer state first: a state directory without it is never complete.
        path = self._table_state_file(offset)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        state = self.sharded.table.optimizer_state()
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        tmp.replace(path)
        super()._save_learner_state(offset)

    def _restore_learner_state(self) -> None:
        super()._restore_learner_state()
        if (state_dir(self.run_dir, self.offset) / "state.json").is_file():
            saved = load_file(str(self._table_state_file(self.offset)))
            self.sharded.table.restore_optimizer(saved)

    def _prune_learner_states(self, keep_offset: int) -> None:
        super()._prune_learner_states(keep_offset)
        for old in (self.run_dir / "state").glob("table-offset-*.safetensors"):
            if old != self._table_state_file(keep_offset):
                old.unlink(missing_ok=True)

    # ------------------------------------------------------------------ one micro-batch

    def _owns(self, user: str) -> bool:
        return owner(user, self.context.world_size) == self.context.rank

    def _admit(self, raw: str, offset: int, sequence: list[int]) -> int:
        """Every process admits the same item at the same event (replicated state): the row is
        the mean of its neighbours' rows, looked up through the table, written by its owner."""
        context = self.pending.admit(raw)
        neighbours = context
        if self.attributes is not None and self.config.new_item_init == "attributes":
            neighbours = self.attributes.neighbours(raw, self.vocabulary) or context
        known = [i for i in neighbours if 0 < i <= self.vocabulary.num_items]
        ids = torch.tensor(known) if known else torch.arange(1, self.vocabulary.num_items + 1)
        with torch.no_grad():
            row = self.sharded.table.lookup(ids).float().mean(dim=0)
        item = self.vocabulary.add(raw)
        self.sharded.table.write_row(item, row)
        self.sharded.embedding.num_items = self.vocabulary.num_items
        self.model.config.num_items = self.vocabulary.num_items
        self.state.admitted[raw] = offset
        log.info("admitted item %r as %d", raw, item)
        return item

    def process(self, batch: Sequence[LoggedEvent]) -> PrequentialTotals:
        """Every event updates the replicated state; each process scores and learns its own
        users' events; the counts are summed over processes."""
        prefixes: list[list[int]] = []
        targets: list[int] = []
        new_events: dict[str, int] = {}
        for logged in batch:
            before, item = self._observe(logged, admit=True)
            user = logged.event.user_id
            if self._owns(user):
                new_events[user] = new_events.get(user, 0) + (1 if item else 0)
                if before:
                    prefixes.append(before)
                    targets.append(item)
        self.model.eval()
        exclude = self.config.exclude_seen
        with self.times.phase("score"), self.sharded.whole_table(self.vocabulary.num_items + 1):
            online = rank_targets(self.model, prefixes, targets, exclude_seen=exclude)
        frozen = None
        if self.config.score_frozen:
            with self.times.phase("score_frozen"):
                frozen = rank_targets(self.frozen, prefixes, targets, exclude_seen=exclude)
        samples = self._touched_samples(new_events)  # this process's users only
        with self.times.phase("train"):
            for _ in range(self.config.steps_per_batch):
                self._train_step(samples + self._replay_sample())
        self.offset = batch[-1].offset
        self._unpublished_events += len(batch)
        mine = totals_from_ranks(online, frozen, len(batch) if self.context.is_main else 0)
        totals = _sum_totals(mine)
        self.state.totals.add(totals)
        self.prequential.append(self.offset, totals, self.state.totals)
        return totals

    def _replay_count(self) -> int:
        """This process's share of `replay_windows` (each draws from its own RNG)."""
        ctx, count = self.context, self.config.replay_windows
        return count // ctx.world_size + (1 if ctx.rank < count % ctx.world_size else 0)

    def _train_step(self, samples: Sequence[Sample]) -> None:
        """One collective step: every row bound through one lookup, the local loss's gradients
        accumulated, the encoder's averaged over processes, then the fused table update (the
        lookup's backward) and AdamW. A process with nothing to learn still takes part."""
        ctx, num_items = self.context, self.vocabulary.num_items
        needed = torch.arange(1, num_items + 1)
        if self.config.table_state_decay < 1:  # before the lookup, which saves the state
            self.sharded.table.decay_optimizer_state(self.config.table_state_decay)
        rows = self.sharded.table.lookup(needed)  # collective, differentiable
        bound = rows.detach().requires_grad_()
        self.sharded.embedding.bind(needed, bound)
        self.dense_optimizer.zero_grad(set_to_none=True)
        train_step(
            self.model,
            samples,
            [],  # the step below is collective: gradients only here
            self._loss_config,
            num_items=num_items,
            grad_clip=None,
            context_config=self._context_config,
            context_fraction=self.config.context_fraction,
        )
        dense = [p for p in self.model.parameters() if p.requires_grad]
        _average_gradients(dense, ctx)
        if self.config.grad_clip and dense:
            torch.nn.utils.clip_grad_norm_(dense, self.config.grad_clip)
        table_grad = bound.grad if bound.grad is not None else torch.zeros_like(bound)
        rows.backward(table_grad / ctx.world_size)  # type: ignore[no-untyped-call]
        if self.config.train_dense:
            self.dense_optimizer.step()

    # ------------------------------------------------------------------ publishing

    def due(self) -> bool:
        return agree(super().due(), self.context)  # rank 0's clock decides for everyone

    def _publish(self) -> str:
        ctx = self.context
        started = time.perf_counter()
        changes: dict[str, Any] = dict(diff_state(self._published, self.model.state_dict(), TABLE))
        rows, values = self._changed_rows()
        if len(rows):
            changes[TABLE] = RowUpdate(rows=rows, values=values)
        grown = self.vocabulary.num_items != self._published_items
        vocabulary = self.vocabulary.parquet_bytes() if grown else None
        parent = self.version
        self.state.offset = self.offset
        self.state.deltas += 1
        self._save_learner_state(self.offset)
        crash_point("state-saved")
        dist.barrier()  # every process's state for this offset exists before the version does
        version = ""
        if ctx.is_main:
            version = publish_version(
                self.registry,
                Delta(parent, changes),
                model=config_to_dict(self.model),
                metrics={f"online/{k}": v for k, v in self.state.totals.summary().items()},
                method="online",
                training=self._training_record(),
                side=SideFiles(vocabulary=vocabulary, item_counts=self.item_counts),
            )
            crash_point("published")
            self.events.commit(self.config.consumer, self.offset)
            crash_point("committed")
            if self.config.promote or self.registry.production() == parent:
                self.registry.promote(version)
        version = _broadcast_version(version, ctx)
        self.version = version
        self._published_items = self.vocabulary.num_items
        self._unpublished_events = 0
        self._last_publish = time.monotonic()
        log.info(
            "published %s (parent %s): offset %d, %d rows, %.2fs",
            version, parent, self.offset, len(rows), time.perf_counter() - started,
        )  # fmt: skip
        if self.config.compact_every and self.state.deltas >= self.config.compact_every:
            self._compact()
        self._prune_learner_states(self.offset)
        return version

    def _training_record(self) -> dict[str, Any]:
        return {
            "online": self.state.to_json(),
            "config": dataclasses.asdict(self.config),
            "world_size": self.context.world_size,
            "sharding": self.sharded.table.plan.to_json(),
        }

    def _compact(self) -> None:
        self.state.deltas = 0
        compacted = ""
        if self.context.is_main:
            compacted = self.registry.compact(self.version, training=self._training_record())
            if self.registry.production() == self.version:
                self.registry.promote(compacted)
            log.info("compacted %s into full version %s", self.version, compacted)
        self.version = _broadcast_version(compacted, self.context)

    def _changed_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row ids, rows) that moved since the last publish, plus every admitted row, from
        every process (collective; the same result everywhere)."""
        limit, first_new = self.vocabulary.num_items + 1, self._published_items + 1
        ids, values = [], []
        for (start, now), (_, old) in zip(
            self.sharded.table.row_blocks(), self._published_rows, strict=True
        ):
            end = min(start + len(now), limit)
            if end <= start:
                continue
            moved = (now[: end - start] != old[: end - start]).any(dim=1)
            global_ids = torch.arange(start, end)
            moved |= global_ids >= first_new  # admitted rows are published whatever they hold
            ids.append(global_ids[moved])
            values.append(now[: end - start][moved].detach().clone())
            old.copy_(now.detach())
        dim = self.sharded.table.dim
        local_ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
        local_values = torch.cat(values) if values else torch.zeros(0, dim)
        all_ids, all_values = _all_gather_rows(local_ids, local_values, self.context)
        order = torch.argsort(all_ids)
        return all_ids[order], all_values[order]

    def run(
        self,
        *,
        follow: bool = False,
        max_events: int | None = None,
        stop: threading.Event | None = None,
        show_progress: bool = False,
    ) -> RunSummary:
        stop = stop or threading.Event()
        self.reads.stop = stop
        summary = super().run(
            follow=follow,
            max_events=max_events,
            stop=stop,
            show_progress=show_progress and self.context.is_main,
        )
        self.sharded.table.close()
        return summary


# --------------------------------------------------------------------------- collectives


def _all_reduce(tensor: torch.Tensor, op: Any) -> torch.Tensor:
    out = tensor.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=op)
    return out


def _sum_totals(mine: PrequentialTotals) -> PrequentialTotals:
    """The micro-batch's counts summed over processes (float64 holds the int counts exactly)."""
    names = [f.name for f in dataclasses.fields(mine)]
    values = torch.tensor([float(getattr(mine, n)) for n in names], dtype=torch.float64)
    summed = _all_reduce(values, dist.ReduceOp.SUM).tolist()
    return PrequentialTotals(
        **{
            n: round(v) if isinstance(getattr(mine, n), int) else v
            for n, v in zip(names, summed, strict=True)
        }
    )


def _average_gradients(params: Sequence[torch.Tensor], ctx: DistContext) -> None:
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = _all_reduce(flat, dist.ReduceOp.SUM) / ctx.world_size
    offset = 0
    for param in params:
        size = param.numel()
        param.grad = flat[offset : offset + size].view_as(param).clone()
        offset += size


def _all_gather_rows(
    ids: torch.Tensor, values: torch.Tensor, ctx: DistContext
) -> tuple[torch.Tensor, torch.Tensor]:
    if not ctx.distributed:
        return ids, values
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, torch.tensor([len(ids)]))
    longest = max(int(s.item()) for s in sizes)
    padded_ids = torch.zeros(longest, dtype=torch.long)
    padded_values = torch.zeros(longest, values.shape[1])
    padded_ids[: len(ids)], padded_values[: len(ids)] = ids, values
    all_ids = [torch.zeros_like(padded_ids) for _ in range(ctx.world_size)]
    all_values = [torch.zeros_like(padded_values) for _ in range(ctx.world_size)]
    dist.all_gather(all_ids, padded_ids)
    dist.all_gather(all_values, padded_values)
    counts = [int(s.item()) for s in sizes]
    return (
        torch.cat([t[:n] for t, n in zip(all_ids, counts, strict=True)]),
        torch.cat([t[:n] for t, n in zip(all_values, counts, strict=True)]),
    )


def _broadcast_version(version: str, ctx: DistContext) -> str:
    """Rank 0's version id ("v000123") on every process."""
    if not ctx.distributed:
        return version
    number = torch.tensor([int(version[1:]) if version else 0])
    dist.broadcast(number, src=0)
    return f"v{int(number.item()):06d}"


def _padded_reader(weight: torch.Tensor) -> Callable[[int, int, int, int], torch.Tensor]:
    """Blocks of `weight`, zero past its rows (the table's headroom for admitted items)."""

    def read(row_start: int, row_end: int, col_start: int, col_end: int) -> torch.Tensor:
        block = torch.zeros(row_end - row_start, col_end - col_start)
        stop = min(row_end, len(weight))
        if stop > row_start:
            block[: stop - row_start] = weight[row_start:stop, col_start:col_end]
        return block

    return read
