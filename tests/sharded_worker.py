"""Run under torchrun by tests/test_sharded.py: loads a version's item table into a table
sharded over this world size (resharding on load) and writes the gathered table (rank 0)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from recloop.config import TrainConfig
from recloop.registry import Registry
from recloop.train.distributed import init_distributed, shutdown
from recloop.train.sharding.table import ShardedItemTable


def main(registry_dir: str, ref: str, sharding: str, out: str) -> None:
    torch.set_num_threads(1)
    context = init_distributed("cpu")
    registry = Registry(Path(registry_dir), create=False)
    rows, dim = registry.manifest(ref).tensors["item_embedding.weight"].shape
    table = ShardedItemTable(rows, dim, TrainConfig(sharding=sharding), context, init_std=0.02)  # type: ignore[arg-type]
    table.load(registry.table_reader(ref))
    gathered = table.gather()
    if context.is_main:
        save_file({"table": gathered, "shards": torch.tensor(len(table.plan.shards))}, out)
    table.close()  # every process together: none tears its groups down under another's feet
    shutdown(context)


if __name__ == "__main__":
    main(*sys.argv[1:5])
