"""How a table is split into rectangular shards, as a sharded version's manifest records it.

The training side (recloop.train.sharding) makes these plans from TorchRec's; the registry
stores one file per shard and reads any block of the table back from them, so a version
written by N processes loads into one process or into M.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from recloop.errors import RegistryError

# The tensor a sharded item table is published as (gathered, it is the model's own weight).
TENSOR_NAME = "item_embedding.weight"


@dataclass(frozen=True)
class TableShard:
    """One rectangular piece of the [rows, dim] table, held by `rank`."""

    rank: int
    row_offset: int
    col_offset: int
    rows: int
    cols: int

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "offsets": [self.row_offset, self.col_offset],
            "sizes": [self.rows, self.cols],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TableShard:
        offsets, sizes = data["offsets"], data["sizes"]
        return cls(
            int(data["rank"]), int(offsets[0]), int(offsets[1]), int(sizes[0]), int(sizes[1])
        )


@dataclass(frozen=True)
class ShardingPlan:
    """How one table is split: its type, the world size it was split for, and every shard."""

    sharding_type: str
    world_size: int
    num_rows: int
    dim: int
    shards: tuple[TableShard, ...]

    def of_rank(self, rank: int) -> tuple[TableShard, ...]:
        return tuple(shard for shard in self.shards if shard.rank == rank)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.sharding_type,
            "world_size": self.world_size,
            "shape": [self.num_rows, self.dim],
            "shards": [shard.to_json() for shard in self.shards],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardingPlan:
        shape = data["shape"]
        return cls(
            sharding_type=str(data["type"]),
            world_size=int(data["world_size"]),
            num_rows=int(shape[0]),
            dim=int(shape[1]),
            shards=tuple(TableShard.from_json(s) for s in data["shards"]),
        )

    def check_tiles(self) -> None:
        """RegistryError unless the shards cover the [rows, dim] table exactly once."""
        covered = sum(shard.rows * shard.cols for shard in self.shards)
        for shard in self.shards:
            inside = (
                shard.row_offset >= 0
                and shard.row_offset + shard.rows <= self.num_rows
                and shard.col_offset >= 0
                and shard.col_offset + shard.cols <= self.dim
            )
            if not inside or shard.rows < 1 or shard.cols < 1:
                raise RegistryError(f"sharding plan: shard {shard.to_json()} is outside the table")
        if covered != self.num_rows * self.dim or _overlap(self.shards):
            raise RegistryError(
                f"sharding plan: its {len(self.shards)} shards do not tile the "
                f"[{self.num_rows}, {self.dim}] table exactly"
            )


@dataclass(frozen=True)
class TableSharding:
    """What a sharded version's manifest records of one table: its plan, and the file of
    each shard of ``plan.shards`` (same order), named relative to the version directory."""

    plan: ShardingPlan
    files: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {**self.plan.to_json(), "files": list(self.files)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TableSharding:
        """The recorded sharding; KeyError/TypeError/ValueError when malformed (the manifest
        reader turns them into an error naming the file and table)."""
        files = data["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise TypeError("'files' must be a list of file names")
        plan = ShardingPlan.from_json(data)
        if len(files) != len(plan.shards):
            raise ValueError(f"{len(plan.shards)} shards but {len(files)} files")
        return cls(plan, tuple(files))

    def describe(self) -> str:
        """A short summary for version lists: "row_wise x2"."""
        return f"{self.plan.sharding_type} x{self.plan.world_size}"


def _overlap(shards: Sequence[TableShard]) -> bool:
    for i, a in enumerate(shards):
        for b in shards[i + 1 :]:
            rows = a.row_offset < b.row_offset + b.rows and b.row_offset < a.row_offset + a.rows
            cols = a.col_offset < b.col_offset + b.cols and b.col_offset < a.col_offset + a.cols
            if rows and cols:
                return True
    return False
