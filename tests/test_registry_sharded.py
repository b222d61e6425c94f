"""Sharded versions: one file per shard plus the plan, gathered on load, read back by block
(resharding on load into another world size), deltas on top, verification and validation.

Pure CPU and no TorchRec: the shard files are slices of a known table, written as each rank
would write its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

from recloop.cli.versions_table import format_versions_table
from recloop.errors import RegistryError
from recloop.models.factory import build_model, config_to_dict
from recloop.registry import (
    MANIFEST,
    TENSOR_NAME,
    WEIGHTS,
    Registry,
    RowUpdate,
    ShardedTable,
    ShardingPlan,
    TableShard,
    publish_version,
    write_shard,
)
from recloop.registry.loading import load_model
from tests.test_registry import flip_byte, visible_state

MODEL = {"type": "sasrec", "config": {"dim": 6, "num_items": 10}}
ROWS, DIM = 11, 6  # num_items + 1 rows


def table(seed: int = 0) -> torch.Tensor:
    return torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(seed))


def dense(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"proj.weight": torch.randn(DIM, DIM, generator=g), "item_bias": torch.randn(ROWS)}


def row_wise(rows: int = ROWS, dim: int = DIM, world: int = 2) -> ShardingPlan:
    """TorchRec's row-wise split: ceil(rows / world) rows per rank, the last one shorter."""
    size = -(-rows // world)
    shards = tuple(
        TableShard(rank, rank * size, 0, min(size, rows - rank * size), dim)
        for rank in range(world)
    )
    return ShardingPlan("row_wise", world, rows, dim, shards)


def column_wise(rows: int = ROWS, dim: int = DIM) -> ShardingPlan:
    half = dim // 2
    shards = (TableShard(0, 0, 0, rows, half), TableShard(1, 0, half, rows, dim - half))
    return ShardingPlan("column_wise", 2, rows, dim, shards)


def write_shards(directory: Path, full: torch.Tensor, plan: ShardingPlan) -> ShardedTable:
    """Each rank's file, as that rank would write it: its block of the table."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for shard in plan.shards:
        block = full[
            shard.row_offset : shard.row_offset + shard.rows,
            shard.col_offset : shard.col_offset + shard.cols,
        ]
        path = directory / f"rank{shard.rank}-{shard.row_offset}-{shard.col_offset}.safetensors"
        write_shard(path, block)
        files.append(path)
    return ShardedTable(plan, tuple(files))


def four_way_blocks(rows: int = ROWS) -> list[tuple[int, int]]:
    size = -(-rows // 4)
    return [(start, min(start + size, rows)) for start in range(0, rows, size)]


# ---------------------------------------------------------------- publish / load


@pytest.mark.parametrize("plan", [row_wise(), column_wise()], ids=["row_wise", "column_wise"])
def test_sharded_version_loads_gathered_and_lists_its_shards(
    tmp_path: Path, plan: ShardingPlan
) -> None:
    reg = Registry(tmp_path / "reg")
    full, rest = table(), dense()
    sharded = write_shards(tmp_path / "shards", full, plan)
    version = reg.publish(rest, model=MODEL, sharded=sharded, metrics={"loss": 0.5})

    loaded = reg.load_tensors(version)
    assert list(loaded) == [*rest, TENSOR_NAME]
    assert torch.equal(loaded[TENSOR_NAME], full) and loaded[TENSOR_NAME].dtype == torch.float32
    for name, tensor in rest.items():
        assert torch.equal(loaded[name], tensor)

    names = [f"{TENSOR_NAME}.shard-0000{i}-of-00002.safetensors" for i in range(2)]
    m = json.loads((reg.path(version) / MANIFEST).read_text())
    assert m["tensors"][TENSOR_NAME] == {"dtype": "float32", "shape": [ROWS, DIM]}
    assert m["sharding"] == {TENSOR_NAME: {**plan.to_json(), "files": names}}
    directory = reg.path(version)
    on_disk = {p.name for p in directory.iterdir()} - {MANIFEST}
    assert set(m["files"]) == on_disk == {WEIGHTS, *names}
    # The shard files are links to the ranks' files, not copies.
    for source, name in zip(sharded.files, names, strict=True):
        assert (directory / name).stat().st_ino == source.stat().st_ino
    assert reg.manifest(version).weights_bytes == sum(meta["bytes"] for meta in m["files"].values())
    reg.verify(version)

    info = reg.list()[0]
    assert info.sharding == f"{plan.sharding_type} x2"
    console = Console(width=200, record=True)
    console.print(format_versions_table(reg.list()))
    assert f"full, sharded {plan.sharding_type} x2" in console.export_text()


def test_dense_weights_file_holds_no_sharded_tensor(tmp_path: Path) -> None:
    from safetensors import safe_open

    reg = Registry(tmp_path / "reg")
    version = reg.publish(dense(), model=MODEL, sharded=write_shards(tmp_path, table(), row_wise()))
    with safe_open(reg.path(version) / WEIGHTS, framework="pt") as handle:
        assert set(handle.keys()) == set(dense())


def test_real_model_loads_from_a_sharded_version_and_compacts_dense(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    torch.manual_seed(0)
    model = build_model("sasrec", {"num_items": 10, "dim": 6, "num_blocks": 1, "max_length": 5})
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    full = state.pop(TENSOR_NAME)
    sharded = write_shards(tmp_path / "shards", full, row_wise(len(full), full.shape[1]))
    version = publish_version(
        reg, state, model=config_to_dict(model), method="train", sharded=sharded
    )

    loaded, manifest = load_model(reg, version)
    assert manifest.sharding is not None
    assert torch.equal(loaded.state_dict()[TENSOR_NAME], full)

    compacted = reg.compact(version)
    c = reg.manifest(compacted)
    assert c.sharding is None and set(c.files) == {WEIGHTS}  # gathered, shards not linked
    assert torch.equal(reg.load_tensors(compacted)[TENSOR_NAME], full)


# ---------------------------------------------------------------- resharding on load


def test_table_reader_reshards_two_shards_into_four(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    full = table()
    version = reg.publish(dense(), model=MODEL, sharded=write_shards(tmp_path, full, row_wise()))
    read = reg.table_reader(version)
    for start, end in four_way_blocks():  # 2 -> 4
        assert torch.equal(read(start, end, 0, DIM), full[start:end])
    assert torch.equal(read(0, ROWS, 0, DIM), full)  # 2 -> 1
    assert torch.equal(read(4, 9, 2, 5), full[4:9, 2:5])  # a block across both shards
    assert read(3, 3, 0, DIM).shape == (0, DIM)

    cols = reg.publish(
        dense(), model=MODEL, sharded=write_shards(tmp_path / "c", full, column_wise())
    )
    read_cols = reg.table_reader(cols)
    for start, end in four_way_blocks():  # column-wise 2 -> row-wise 4
        assert torch.equal(read_cols(start, end, 0, DIM), full[start:end])


def test_table_reader_splits_a_plain_version(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    full = table()
    version = reg.publish({**dense(), TENSOR_NAME: full}, model=MODEL)
    read = reg.table_reader(version)
    for start, end in ((0, 6), (6, ROWS)):  # 1 -> 2
        assert torch.equal(read(start, end, 0, DIM), full[start:end])
    for start, end in four_way_blocks():  # 1 -> 4
        assert torch.equal(read(start, end, 0, DIM), full[start:end])
    with pytest.raises(RegistryError, match=r"block rows 0\.\.12, cols 0\.\.6 is outside"):
        read(0, ROWS + 1, 0, DIM)
    with pytest.raises(RegistryError, match=r"'item_bias' has shape \[11\]; blocks are read"):
        reg.table_reader(version, "item_bias")
    with pytest.raises(RegistryError, match=r"has no tensor 'nope'"):
        reg.table_reader(version, "nope")


def test_table_reader_verifies_only_the_files_it_reads(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    full = table()
    version = reg.publish(dense(), model=MODEL, sharded=write_shards(tmp_path, full, row_wise()))
    second = reg.manifest(version).shard_files[1]
    flip_byte(reg.path(version) / second)
    read = reg.table_reader(version)
    assert torch.equal(read(0, 6, 0, DIM), full[:6])  # rank 0's rows: shard 0 only
    with pytest.raises(RegistryError, match=rf"version {version} is corrupt: file {second}"):
        read(5, 7, 0, DIM)


# ---------------------------------------------------------------- deltas, verification


def test_delta_on_a_sharded_base_materialises(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    full, rest = table(), dense()
    base = reg.publish(rest, model=MODEL, sharded=write_shards(tmp_path, full, row_wise()))
    rows = torch.tensor([0, 7, 11, 12])  # two changed rows (one per shard), two new items
    values = torch.randn(4, DIM, generator=torch.Generator().manual_seed(5))
    delta = reg.publish_delta(base, {TENSOR_NAME: RowUpdate(rows, values)})
    second = reg.publish_delta(delta, {"proj.weight": torch.zeros(DIM, DIM)})

    expected = torch.cat([full, torch.zeros(2, DIM)])
    expected[rows] = values
    loaded = reg.load_tensors(second)
    assert torch.equal(loaded[TENSOR_NAME], expected)
    assert torch.equal(loaded["item_bias"], rest["item_bias"])
    assert torch.equal(loaded["proj.weight"], torch.zeros(DIM, DIM))
    assert reg.manifest(delta).sharding is None and reg.manifest(base).sharding is not None
    read = reg.table_reader(second)  # a delta: its chain materialised once
    assert torch.equal(read(6, ROWS + 2, 0, DIM), expected[6:])


def test_verify_names_a_corrupted_shard_file(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    base = reg.publish(dense(), model=MODEL, sharded=write_shards(tmp_path, table(), row_wise()))
    delta = reg.publish_delta(base, {"proj.weight": torch.zeros(DIM, DIM)})
    shard = reg.manifest(base).shard_files[1]
    path = reg.path(base) / shard
    pristine = path.read_bytes()
    flip_byte(path, offset=len(pristine) // 2)
    pattern = rf"version {base} is corrupt: file {shard} does not match its sha256"
    for check in (reg.verify, reg.load_tensors, reg.promote):
        with pytest.raises(RegistryError, match=pattern):
            check(delta)
    path.write_bytes(pristine)
    reg.verify(delta)


def test_a_manifest_that_hides_a_shard_file_is_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    version = reg.publish(dense(), model=MODEL, sharded=write_shards(tmp_path, table(), row_wise()))
    path = reg.path(version) / MANIFEST
    m = json.loads(path.read_text())
    hidden = m["sharding"][TENSOR_NAME]["files"][0]
    del m["files"][hidden]  # verify() would no longer check it
    path.write_text(json.dumps(m))
    with pytest.raises(RegistryError, match=rf"does not list shard file {hidden}"):
        reg.manifest(version)


# ---------------------------------------------------------------- validation


def test_bad_sharded_publishes_raise_and_leave_nothing_behind(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    reg.publish(dense(), model=MODEL)
    full = table()
    good = write_shards(tmp_path / "good", full, row_wise())
    before = visible_state(tmp_path / "reg")
    wide = tmp_path / "wide.safetensors"
    write_shard(wide, torch.zeros(6, DIM + 1))
    double = tmp_path / "double.safetensors"
    write_shard(double, full[:6].double())
    two = tmp_path / "two.safetensors"
    save_file({"a": full[:6].clone(), "b": full[:6].clone()}, two)
    gap = ShardingPlan(
        "row_wise", 2, ROWS, DIM, (TableShard(0, 0, 0, 5, DIM), TableShard(1, 6, 0, 5, DIM))
    )
    overlap = ShardingPlan(
        "row_wise", 2, ROWS, DIM, (TableShard(0, 0, 0, 6, DIM), TableShard(1, 5, 0, 6, DIM))
    )
    rank = ShardingPlan(
        "row_wise", 2, ROWS, DIM, (good.plan.shards[0], TableShard(2, 6, 0, 5, DIM))
    )
    cases: list[tuple[dict[str, Any], str]] = [
        ({"sharded": ShardedTable(gap, good.files)}, r"do not tile the \[11, 6\] table"),
        ({"sharded": ShardedTable(overlap, good.files)}, r"do not tile the \[11, 6\] table"),
        ({"sharded": ShardedTable(rank, good.files)}, r"rank outside world size 2"),
        (
            {"sharded": ShardedTable(good.plan, (wide, good.files[1]))},
            r"shard 0 of 'item_embedding.weight': .*wide.safetensors holds a F32 \[6, 7\] "
            r"tensor; the plan says float32 \[6, 6\]",
        ),
        (
            {"sharded": ShardedTable(good.plan, (double, good.files[1]))},
            r"holds a F64 \[6, 6\] tensor",
        ),
        ({"sharded": ShardedTable(good.plan, (two, good.files[1]))}, r"holds 2 tensors"),
        (
            {"sharded": ShardedTable(good.plan, (tmp_path / "gone", good.files[1]))},
            r"gone does not exist",
        ),
        ({"sharded": ShardedTable(good.plan, good.files[:1])}, r"2 shards in the plan but 1"),
        (
            {"tensors": {**dense(), TENSOR_NAME: full}, "sharded": good},
            r"given both sharded and in the dense tensors",
        ),
        (
            {
                "sharded": good,
                "extra_files": {f"{TENSOR_NAME}.shard-00000-of-00002.safetensors": b""},
            },
            r"clashes with another file",
        ),
    ]
    for kwargs, pattern in cases:
        kwargs = {"tensors": dense(), "model": MODEL, **kwargs}
        with pytest.raises(RegistryError, match=pattern):
            reg.publish(**kwargs)
        assert visible_state(tmp_path / "reg") == before, pattern
    assert len(reg.list()) == 1
    assert not list((tmp_path / "reg").glob(".tmp-*"))


def test_write_shard_replaces_atomically_without_touching_a_published_link(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    full = table()
    sharded = write_shards(tmp_path / "shards", full, row_wise())
    version = reg.publish(dense(), model=MODEL, sharded=sharded)
    write_shard(sharded.files[0], torch.zeros(6, DIM))  # the next checkpoint, same path
    assert torch.equal(reg.load_tensors(version)[TENSOR_NAME], full)
    assert [p.name for p in (tmp_path / "shards").iterdir() if p.name.startswith(".")] == []
    with pytest.raises(RegistryError, match=r"expected a 2-d tensor, got a 1-d tensor \[3\]"):
        write_shard(tmp_path / "x.safetensors", torch.zeros(3))
