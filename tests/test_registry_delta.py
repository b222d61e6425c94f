"""Delta versions of the model registry: publish, load (chains), compact, validation, lineage."""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console
from safetensors import safe_open

from recloop.cli.versions_table import format_versions_table
from recloop.errors import RegistryError
from recloop.models.factory import build_model, config_to_dict
from recloop.registry import WEIGHTS, Registry, RowUpdate
from recloop.registry.loading import check_vocabulary, load_model
from tests.test_registry import flip_byte, visible_state

MODEL = {"type": "sasrec", "config": {"dim": 16, "num_items": 2000}}
Tensors = dict[str, torch.Tensor]
Change = torch.Tensor | RowUpdate


def base_tensors(items: int = 2000, dim: int = 16, seed: int = 0) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    return {
        "item_embedding.weight": torch.randn(items + 1, dim, generator=g),
        "proj.weight": torch.randn(dim, dim, generator=g),
        "norm.bias": torch.randn(dim, generator=g).to(torch.bfloat16),
        "item_bias": torch.randn(items + 1, generator=g),
        "positions": torch.arange(7, dtype=torch.int64),
    }


def rows_update(
    rows: Sequence[int] | torch.Tensor, trailing: Sequence[int], seed: int
) -> RowUpdate:
    index = torch.as_tensor(rows, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    return RowUpdate(index, torch.randn(len(index), *trailing, generator=g))


def apply_by_hand(
    state: Mapping[str, torch.Tensor], changes: Mapping[str, Change], removed: Sequence[str] = ()
) -> Tensors:
    """The reference semantics, written the naive way (a copy per step, growth by cat)."""
    out = {name: t.clone() for name, t in state.items() if name not in removed}
    for name, change in changes.items():
        if isinstance(change, torch.Tensor):
            out[name] = change.clone()
            continue
        table = out[name]
        top = int(change.rows.max()) + 1
        if top > len(table):
            table = torch.cat([table, table.new_zeros(top - len(table), *table.shape[1:])])
        table[change.rows] = change.values
        out[name] = table
    return out


def assert_bitwise_equal(
    actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> None:
    assert list(actual) == list(expected)
    for name, tensor in expected.items():
        got = actual[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        # Raw bytes, so NaN payloads and -0.0 count too (torch.equal says NaN != NaN).
        assert torch.equal(got.flatten().view(torch.uint8), tensor.flatten().view(torch.uint8)), (
            name
        )


def stored_names(reg: Registry, version: str) -> set[str]:
    with safe_open(reg.path(version) / WEIGHTS, framework="pt") as f:
        return set(f.keys())


def vocab_parquet(path: Path, items: int) -> Path:
    pq.write_table(pa.table({"id": list(range(1, items + 1))}), path)
    return path


# ---------------------------------------------------------------- publish / load / compact


def test_delta_loads_bitwise_like_the_full_snapshot_and_its_compaction(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    base = base_tensors()
    v1 = reg.publish(base, model=MODEL, metrics={"ndcg": 0.3})
    changed = torch.randperm(2001, generator=torch.Generator().manual_seed(1))[:1000]
    table = rows_update(torch.cat([changed, torch.arange(2001, 2051)]), [16], seed=2)
    table.values[0, 0], table.values[1, 1] = float("nan"), -0.0  # bitwise, not just ==
    changes: dict[str, Change] = {
        "item_embedding.weight": table,
        "proj.weight": torch.randn(16, 16, generator=torch.Generator().manual_seed(3)),
    }
    model = {"type": "sasrec", "config": {"dim": 16, "num_items": 2050}}
    delta = reg.publish_delta(v1, changes, model=model, metrics={"ndcg": 0.31})
    expected = apply_by_hand(base, changes)

    assert_bitwise_equal(reg.load_tensors(delta), expected)
    m = reg.manifest(delta).to_json()
    assert (m["kind"], m["method"], m["parent"], m["base"], m["chain_depth"]) == (
        "delta",
        "online",
        v1,
        v1,
        1,
    )
    assert m["model"] == model and m["metrics"] == {"ndcg": 0.31} and m["removed"] == []
    assert m["delta"] == {
        "item_embedding.weight": {
            "mode": "rows",
            "rows": "item_embedding.weight.rows",
            "num_rows": 1050,
            "shape": [2051, 16],
        },
        "proj.weight": {"mode": "replace"},
    }
    # "tensors" describes the full result; the file holds only what changed.
    assert m["tensors"] == {
        n: {"dtype": str(t.dtype)[6:], "shape": list(t.shape)} for n, t in expected.items()
    }
    assert stored_names(reg, delta) == {
        "item_embedding.weight",
        "item_embedding.weight.rows",
        "proj.weight",
    }
    assert list(m["files"]) == [WEIGHTS]

    compacted = reg.compact(delta)
    c = reg.manifest(compacted).to_json()
    assert (c["kind"], c["method"], c["parent"]) == ("full", "compact", delta)
    assert c["model"] == model and c["metrics"] == {"ndcg": 0.31} and c["tensors"] == m["tensors"]
    assert_bitwise_equal(reg.load_tensors(compacted), expected)
    # The same tensors published as a plain full version load identically too.
    full = reg.publish(expected, model=model)
    assert_bitwise_equal(reg.load_tensors(full), reg.load_tensors(delta))
    # A delta on top of the compacted version starts a fresh chain.
    again = reg.publish_delta(compacted, {"item_bias": rows_update([5], [], seed=4)})
    assert (
        reg.manifest(again).to_json()["base"],
        reg.manifest(again).to_json()["chain_depth"],
    ) == (compacted, 1)
    # The compacting publisher may replace the training record (its chain counters restart).
    recorded = reg.compact(again, training={"online": {"deltas": 0}})
    assert reg.manifest(recorded).to_json()["training"] == {"online": {"deltas": 0}}
    assert (
        reg.manifest(compacted).to_json()["training"] == reg.manifest(delta).to_json()["training"]
    )


def test_chain_of_three_deltas_equals_the_changes_applied_by_hand(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    state = base_tensors(items=300, dim=8)
    v1 = reg.publish(state, model=MODEL)
    steps: list[tuple[dict[str, Change], list[str]]] = [
        # rows 10..109 changed, 301..320 new (grows to 321 rows); the bias rows too
        (
            {
                "item_embedding.weight": rows_update([*range(10, 110), *range(301, 321)], [8], 1),
                "item_bias": rows_update([3, 2, 1], [], 2),
            },
            [],
        ),
        # overlaps the first (50..149), grows again (321..339), replaces a dense tensor, adds one
        (
            {
                "item_embedding.weight": rows_update(
                    [*range(339, 320, -1), *range(50, 150)], [8], 3
                ),
                "proj.weight": torch.randn(8, 8),
                "new.weight": torch.randn(4, 2),
            },
            [],
        ),
        # rows of the replaced/added tensors, overlapping rows again, a removal
        (
            {
                "item_embedding.weight": rows_update([0, 60, 320, 339], [8], 4),
                "new.weight": rows_update([1, 4], [2], 5),
                "proj.weight": rows_update([7], [8], 6),
            },
            ["positions"],
        ),
    ]
    versions, parent, expected = [], v1, []
    for changes, removed in steps:
        parent = reg.publish_delta(parent, changes, removed=removed)
        state = apply_by_hand(state, changes, removed)
        versions.append(parent)
        expected.append(state)

    for depth, (version, tensors) in enumerate(zip(versions, expected, strict=True), start=1):
        m = reg.manifest(version).to_json()
        assert (m["base"], m["chain_depth"]) == (v1, depth)
        assert_bitwise_equal(
            dict(sorted(reg.load_tensors(version).items())), dict(sorted(tensors.items()))
        )
    assert reg.manifest(versions[2]).to_json()["removed"] == ["positions"]
    assert reg.manifest(versions[2]).to_json()["tensors"]["item_embedding.weight"]["shape"] == [
        340,
        8,
    ]
    assert "positions" not in reg.load_tensors(versions[2])


def test_replace_after_row_updates_and_readding_a_removed_tensor(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    state = base_tensors(items=20, dim=4)
    parent = reg.publish(state, model=MODEL)
    steps: list[tuple[dict[str, Change], list[str]]] = [
        ({"item_bias": rows_update([21, 22], [], 1)}, ["positions"]),
        ({"item_bias": torch.randn(5), "positions": torch.arange(3)}, []),  # shrinks, re-adds
        ({"item_bias": rows_update([0, 5], [], 2)}, []),
    ]
    for changes, removed in steps:
        parent = reg.publish_delta(parent, changes, removed=removed)
        state = apply_by_hand(state, changes, removed)
    assert_bitwise_equal(
        dict(sorted(reg.load_tensors(parent).items())), dict(sorted(state.items()))
    )


def test_slices_and_non_contiguous_values_are_stored_correctly(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    base = base_tensors(items=20, dim=4)
    v1 = reg.publish(base, model=MODEL)
    big = torch.randn(10, 4)
    changes: dict[str, Change] = {
        "item_embedding.weight": RowUpdate(torch.tensor([3, 1], dtype=torch.int32), big[2:4]),
        "proj.weight": torch.randn(4, 4).t(),
    }
    delta = reg.publish_delta(v1, changes)
    assert_bitwise_equal(reg.load_tensors(delta), apply_by_hand(base, changes))


# ---------------------------------------------------------------- corruption


def test_a_corrupted_file_anywhere_in_the_chain_names_version_and_file(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    v1 = reg.publish(base_tensors(items=50, dim=4), model=MODEL)
    v2 = reg.publish_delta(v1, {"item_bias": rows_update([1, 2], [], 1)})
    v3 = reg.publish_delta(v2, {"proj.weight": torch.randn(4, 4)})
    for broken in (v1, v2, v3):
        path = reg.path(broken) / WEIGHTS
        pristine = path.read_bytes()
        flip_byte(path, offset=len(pristine) // 2)
        pattern = rf"version {broken} is corrupt: file {WEIGHTS}"
        with pytest.raises(RegistryError, match=pattern):
            reg.load_tensors(v3)
        with pytest.raises(RegistryError, match=pattern):
            reg.verify(v3)
        with pytest.raises(RegistryError, match=pattern):
            reg.promote(v3)  # serving must never be pointed at an unloadable chain
        path.write_bytes(pristine)
    reg.load_tensors(v3)

    shutil.rmtree(reg.path(v2))
    with pytest.raises(RegistryError, match=rf"version {v3}: its parent {v2} is missing"):
        reg.load_tensors(v3)


# ---------------------------------------------------------------- validation


def test_invalid_deltas_raise_and_leave_nothing_behind(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    v1 = reg.publish(base_tensors(items=10, dim=4), model=MODEL)  # 11 rows
    before = visible_state(tmp_path)
    emb = "item_embedding.weight"
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {"changes": {emb: rows_update([11, 13], [4], 0)}},
            rf"row update of '{emb}' grows the tensor from 11 to 14 rows but row 12 is missing",
        ),
        ({"changes": {emb: rows_update([12], [4], 0)}}, r"row 11 is missing"),
        (
            {
                "changes": {
                    emb: RowUpdate(torch.tensor([1]), torch.zeros(1, 4, dtype=torch.float64))
                }
            },
            rf"row update of '{emb}': values are float64 but the tensor is float32",
        ),
        (
            {"changes": {"proj.weight": torch.zeros(4, 4, dtype=torch.float16)}},
            r"'proj.weight' is float16 but float32 in the parent",
        ),
        (
            {"changes": {emb: rows_update([1], [5], 0)}},
            r"values have shape \[1, 5\], expected \[1, 4\]",
        ),
        ({"changes": {emb: rows_update([2, 5, 2], [4], 0)}}, r"row 2 is given more than once"),
        ({"changes": {emb: rows_update([-1], [4], 0)}}, r"negative row -1"),
        (
            {"changes": {emb: RowUpdate(torch.tensor([1.0]), torch.zeros(1, 4))}},
            r"rows must be a 1-d integer tensor",
        ),
        ({"changes": {"brand.new": rows_update([0], [4], 0)}}, r"'brand.new' is not in the parent"),
        ({"changes": {"positions": rows_update([0], [], 0)}}, r"values are float32 but .* int64"),
        ({"changes": {"proj.weight": [1.0]}}, r"is a list, not a torch.Tensor or RowUpdate"),
        (
            {"changes": {emb: rows_update([0], [4], 0), emb + ".rows": torch.zeros(1)}},
            r"also changes a tensor named 'item_embedding.weight.rows'",
        ),
        ({"changes": {}}, r"at least one changed or removed tensor"),
        ({"changes": {}, "removed": ["nope"]}, r"cannot remove tensor 'nope'"),
        (
            {"changes": {"proj.weight": torch.zeros(4, 4)}, "removed": ["proj.weight"]},
            r"both changed and removed",
        ),
        ({"changes": {}, "removed": "positions"}, r"not a string"),
        ({"changes": {}, "removed": list(base_tensors())}, r"no tensors"),
        (
            {"parent": "v000099", "changes": {"proj.weight": torch.zeros(4, 4)}},
            r"unknown version v000099",
        ),
        (
            {"changes": {"proj.weight": torch.zeros(4, 4)}, "vocabulary_file": "items.parquet"},
            r"not one of the extra files",
        ),
        (
            {"changes": {"proj.weight": torch.zeros(4, 4)}, "model": {"config": {}}},
            r"non-empty string 'type'",
        ),
        (
            {"changes": {"proj.weight": torch.zeros(4, 4)}, "metrics": {"loss": float("nan")}},
            r"metrics.loss is nan",
        ),
    ]
    for kwargs, pattern in cases:
        kwargs = {"parent": v1, **kwargs}
        with pytest.raises(RegistryError, match=pattern):
            reg.publish_delta(**kwargs)
        assert visible_state(tmp_path) == before, pattern
    assert [info.id for info in reg.list()] == [v1]


# ---------------------------------------------------------------- vocabulary, model, lineage


def test_vocabulary_is_inherited_linked_or_replaced(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    vocab = vocab_parquet(tmp_path / "items.parquet", 10)
    v1 = reg.publish(
        base_tensors(items=10, dim=4),
        model=MODEL,
        dataset={"counts": {"items": 10}},
        extra_files={"items.parquet": vocab, "notes.txt": b"base only"},
        vocabulary_file="items.parquet",
    )
    v2 = reg.publish_delta(v1, {"proj.weight": torch.randn(4, 4)})
    m1, m2 = reg.manifest(v1).to_json(), reg.manifest(v2).to_json()
    assert m2["vocabulary"] == m1["vocabulary"] and m2["dataset"] == m1["dataset"]
    assert sorted(m2["files"]) == ["items.parquet", WEIGHTS]  # the vocabulary, not other extras
    assert m2["files"]["items.parquet"] == m1["files"]["items.parquet"]
    assert reg.file(v2, "items.parquet").samefile(reg.file(v1, "items.parquet"))  # hard link
    check_vocabulary(reg, v2, m1["files"]["items.parquet"]["sha256"])

    # New items: a longer vocabulary (past the dataset's 10 items) and a grown table.
    grown = vocab_parquet(tmp_path / "grown.parquet", 12)
    v3 = reg.publish_delta(
        v2,
        {"item_embedding.weight": rows_update([11, 12], [4], 1)},
        extra_files={"items.parquet": grown},
        vocabulary_file="items.parquet",
        model={"type": "sasrec", "config": {"num_items": 12}},
    )
    assert reg.manifest(v3).to_json()["vocabulary"] == {"file": "items.parquet", "items": 12}
    assert reg.load_tensors(v3)["item_embedding.weight"].shape == (13, 4)

    compacted = reg.compact(v3)
    assert reg.manifest(compacted).to_json()["vocabulary"] == {"file": "items.parquet", "items": 12}
    assert reg.file(compacted, "items.parquet").samefile(reg.file(v3, "items.parquet"))

    before = visible_state(tmp_path / "reg")
    with pytest.raises(RegistryError, match="would shadow the vocabulary"):
        reg.publish_delta(
            v3, {"proj.weight": torch.randn(4, 4)}, extra_files={"items.parquet": vocab}
        )
    with pytest.raises(RegistryError, match="has 10 items but the parent's has 12"):
        reg.publish_delta(
            v3,
            {"proj.weight": torch.randn(4, 4)},
            extra_files={"items.parquet": vocab},
            vocabulary_file="items.parquet",
        )
    assert visible_state(tmp_path / "reg") == before


def test_list_table_promote_rollback_and_gc_with_deltas(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    v1 = reg.publish(base_tensors(items=10, dim=4), model=MODEL)
    v2 = reg.publish_delta(v1, {"proj.weight": torch.randn(4, 4)})
    v3 = reg.publish_delta(v2, {"item_bias": rows_update([1], [], 1)}, method="online-sgd")
    infos = reg.list()
    assert [(i.kind, i.chain_depth, i.parent) for i in infos] == [
        ("full", 0, None),
        ("delta", 1, v1),
        ("delta", 2, v2),
    ]
    console = Console(record=True, width=200)
    console.print(format_versions_table(infos))
    text = console.export_text()
    assert "delta (depth 2)" in text and "online-sgd" in text

    assert reg.promote(v2) == v2 and reg.promote(v3) == v3
    assert reg.rollback() == v2 and reg.production() == v2
    assert reg.gc(max_age_seconds=0) == 0  # gc never touches versions, so chains stay loadable
    reg.load_tensors("production")
    reg.load_tensors(v3)


def test_load_model_on_a_delta_of_a_real_sasrec(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    torch.manual_seed(0)
    model = build_model("sasrec", {"num_items": 50, "dim": 16, "num_blocks": 1, "max_length": 10})
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    v1 = reg.publish(state, model=config_to_dict(model))
    update = rows_update([0, 7, 50, 51, 52], [16], seed=1)  # two new items: 51, 52
    grown = build_model("sasrec", {"num_items": 52, "dim": 16, "num_blocks": 1, "max_length": 10})
    delta = reg.publish_delta(
        v1, {"item_embedding.weight": update}, model=config_to_dict(grown), training={"step": 3}
    )

    loaded, manifest = load_model(reg, delta)
    assert manifest.id == delta and manifest.model["num_items"] == 52
    assert_bitwise_equal(
        loaded.state_dict(), apply_by_hand(state, {"item_embedding.weight": update})
    )


# ---------------------------------------------------------------- size


def test_large_row_delta_publish_and_load_times(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(200_000, 64, generator=g)
    v1 = reg.publish({"item_embedding.weight": table, "dense": torch.randn(64, 64)}, model=MODEL)
    rows = torch.randperm(200_000, generator=g)[:100_000]
    update = RowUpdate(rows, torch.randn(100_000, 64, generator=g))

    start = time.perf_counter()
    delta = reg.publish_delta(v1, {"item_embedding.weight": update})
    publish_s = time.perf_counter() - start
    start = time.perf_counter()
    loaded = reg.load_tensors(delta)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    reg.load_tensors(v1)
    load_full_s = time.perf_counter() - start
    print(
        f"\n100k x 64 float32 rows into a 200k-row table: publish_delta {publish_s * 1000:.0f} ms, "
        f"load_tensors(delta) {load_s * 1000:.0f} ms (full base alone {load_full_s * 1000:.0f} ms)"
    )
    table[rows] = update.values
    assert torch.equal(loaded["item_embedding.weight"], table)
