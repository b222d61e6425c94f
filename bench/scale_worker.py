"""One cell of bench/scale.py: SASRec trained for a few steps on synthetic windows over a
catalogue of --items items, in this process or as one torchrun rank; each rank writes its
peak memory and step times to --out/rank<R>.json.

replicated: the model's own nn.Embedding table, trained by AdamW (recloop.train.loop.adamw,
    foreach on CPU as the trainer runs it), the whole model under DDP with 2 processes: every
    rank holds the table, its dense gradient and AdamW's two moments.
sharded: the table is a ShardedItemTable (train.sharding = "row_wise", fused row-wise
    Adagrad): each rank holds its rows and one optimizer value per row; every row a step
    reads is looked up in one collective call (ShardedModel.bind_step); the encoder (whose
    item embedding has no parameters) is under DDP with 2 processes.

Not meant to be run by hand: bench/scale.py launches it (and checks first that it fits).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from recloop.config import TrainConfig
from recloop.models.factory import build_model
from recloop.train.distributed import DistContext, init_distributed, shutdown

# The model every cell trains (bench/scale.py records it in the result's config).
DIM, MAX_LENGTH = 64, 50
MODEL: dict[str, int | float] = {
    "dim": DIM,
    "max_length": MAX_LENGTH,
    "num_blocks": 2,
    "num_heads": 1,
    "dropout": 0.5,
}
# A multiplier coprime to every catalogue size used (a prime above any of them): it scatters
# the popularity ranks over the ids, so the popular items are not all in the first shard.
SCATTER = 2_654_435_761


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def zipf_windows(
    generator: torch.Generator, windows: int, length: int, num_items: int
) -> torch.Tensor:
    """[windows, length + 1] item ids in 1..num_items, Zipf-distributed with exponent 1
    (continuous approximation: popularity rank floor((N + 1)^u), u uniform, so P(rank <= r)
    = log r / log(N + 1)), popularity ranks scattered over the ids by a multiplicative hash."""
    u = torch.rand(windows, length + 1, generator=generator, dtype=torch.float64)
    ranks = torch.exp(u * math.log(num_items + 1)).long().clamp_(1, num_items)
    return (ranks - 1) * SCATTER % num_items + 1


class Cell:
    """The model, its optimizers and one training step, for either mode."""

    def __init__(self, args: argparse.Namespace, ctx: DistContext) -> None:
        from torch.nn.parallel import DistributedDataParallel

        from recloop.train.loop import adamw

        self.args, self.ctx = args, ctx
        sharded = args.mode == "sharded"
        self.cfg = TrainConfig(
            loss=args.loss,
            num_negatives=args.negatives,
            negatives="uniform",
            batch_size=args.batch,
            max_length=MAX_LENGTH,
            sharding="row_wise" if sharded else "none",
            sparse_optimizer="rowwise_adagrad",
        )
        torch.manual_seed(args.seed)  # the same dense initialisation on every rank
        self.sharded: Any = None
        if sharded:
            from recloop.train.sharding.run import build_sharded_model

            # As `recloop train` builds it: the dense part around a one-item table, so the
            # whole [items + 1, dim] table is never allocated on any rank.
            training = build_sharded_model(
                "sasrec", {**MODEL, "num_items": args.items}, self.cfg, ctx
            )
            self.sharded, self.model = training.sharded, training.model
            self.table_rows_here = sum(local.shard.rows for local in training.table.local)
        else:
            self.model = build_model("sasrec", {**MODEL, "num_items": args.items})
            self.table_rows_here = args.items + 1
        self.optimizer = adamw(self.model, self.cfg, fused=False)
        self.forward: nn.Module = (
            DistributedDataParallel(self.model) if ctx.distributed else self.model
        )

    def step(self, windows: torch.Tensor) -> None:
        from recloop.train.losses import next_item_loss

        inputs, targets = windows[:, :-1], windows[:, 1:]
        negatives = self.sharded.bind_step(inputs, targets, self.cfg) if self.sharded else None
        hidden = self.forward(inputs)
        loss_sum, _ = next_item_loss(
            self.model, hidden, targets, self.cfg, self.args.items, inputs, negatives=negatives
        )
        # Every window is full, so the global token count is known: no all-reduce for it.
        global_tokens = self.args.batch * MAX_LENGTH
        loss = loss_sum * self.ctx.world_size / global_tokens
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = init_distributed("cpu")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rss_start = current_rss()
    cell = Cell(args, ctx)
    setup_seconds = time.perf_counter() - started
    memory = {"rss_start": rss_start, "peak_after_setup": peak_rss(), "rss_after_setup": 0}
    memory["rss_after_setup"] = current_rss()
    local = args.batch // ctx.world_size
    generator = torch.Generator().manual_seed(args.seed * 1000 + ctx.rank)
    seconds: list[float] = []
    total = args.warmup + args.steps
    for step in range(total):
        windows = zipf_windows(generator, local, MAX_LENGTH, args.items)
        tick = time.perf_counter()
        cell.step(windows)
        took = time.perf_counter() - tick
        if step >= args.warmup:
            seconds.append(took)
        if ctx.is_main and (step < 2 or (step + 1) % 5 == 0 or step + 1 == total):
            phase = "warm-up" if step < args.warmup else "timed"
            print(
                f"  [{args.mode} {ctx.world_size}p {args.items:,} items] step {step + 1}/{total} "
                f"({phase}) {took:.2f} s, "
                f"peak RSS {peak_rss() / 2**30:.2f} GiB",
                file=sys.stderr,
                flush=True,
            )
    memory |= {"rss_end": current_rss(), "peak_rss": peak_rss()}
    result = {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "threads": torch.get_num_threads(),
        "table_rows_here": cell.table_rows_here,
        "setup_seconds": round(setup_seconds, 2),
        "step_seconds": [round(s, 4) for s in seconds],
        "memory_bytes": memory,
    }
    if cell.sharded is not None:
        cell.sharded.table.close()
    shutdown(ctx)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--mode", choices=("replicated", "sharded"), required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True, help="global windows per step")
    parser.add_argument("--negatives", type=int, required=True)
    parser.add_argument("--loss", choices=("sampled_softmax", "full_softmax"), required=True)
    parser.add_argument("--threads", type=int, required=True, help="torch threads per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{result['rank']}.json").write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
