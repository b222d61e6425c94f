"""The registry still reads what recloop wrote at commit 06dd931 (tests/fixtures/registry-v1).

The fixture is never regenerated (see tests/fixtures/make_registry_v1.py): if one of these
tests fails, the on-disk format changed, and old registries in production would break.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from recloop.registry import MANIFEST, WEIGHTS, Registry, load_model
from recloop.registry.manifest import VocabularyRef
from recloop.registry.sidefiles import read_item_counts, vocabulary_path

FIXTURE = Path(__file__).parent / "fixtures" / "registry-v1"


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    # A copy: promote/rollback and hard links must never write into tests/.
    shutil.copytree(FIXTURE, tmp_path / "registry")
    return Registry(tmp_path / "registry", create=False)


def test_lists_and_verifies_every_version(registry: Registry) -> None:
    infos = registry.list()
    assert [(i.id, i.kind, i.method, i.parent, i.chain_depth) for i in infos] == [
        ("v000001", "full", "train", None, 0),
        ("v000002", "delta", "online", "v000001", 1),
    ]
    assert [i.is_production for i in infos] == [False, True]
    assert all(i.problem is None for i in infos)
    assert infos[0].model_type == "sasrec" and infos[0].metrics["test/HR@10"] == 0.5
    for info in infos:
        registry.verify(info.id)


def test_resolves_aliases_and_rolls_back(registry: Registry) -> None:
    assert registry.resolve("latest") == "v000002"
    assert registry.resolve("production") == registry.production() == "v000002"
    assert registry.rollback() == "v000001"
    assert registry.resolve("production") == "v000001"
    assert registry.promote("latest") == "v000002"


def test_materialises_the_delta(registry: Registry) -> None:
    base = load_file(registry.path("v000001") / WEIGHTS)
    stored = load_file(registry.path("v000002") / WEIGHTS)
    tensors = registry.load_tensors("v000002")
    table = tensors["item_embedding.weight"]
    assert table.shape == (6, 8)
    rows = stored["item_embedding.weight.rows"]
    assert rows.tolist() == [2, 5]
    expected = torch.cat([base["item_embedding.weight"], torch.zeros(1, 8)])
    expected[rows] = stored["item_embedding.weight"]
    assert torch.equal(table, expected)
    norm = "blocks.0.attention_norm.weight"
    assert torch.equal(tensors[norm], base[norm] * 2)
    untouched = [name for name in base if name not in ("item_embedding.weight", norm)]
    assert untouched and all(torch.equal(tensors[n], base[n]) for n in untouched)
    changes, removed = registry.read_delta("v000002")
    assert set(changes) == {"item_embedding.weight", norm} and list(removed) == []


@pytest.mark.parametrize(("version", "items"), [("v000001", 4), ("v000002", 5)])
def test_loads_module_and_side_files(registry: Registry, version: str, items: int) -> None:
    model, manifest = load_model(registry, version)
    assert model.config.num_items == items and not model.training
    state = model.state_dict()
    for name, tensor in registry.load_tensors(version).items():
        assert torch.equal(state[name], tensor), name
    vocabulary = pl.read_parquet(vocabulary_path(registry, version, manifest))
    assert vocabulary["raw"].to_list() == [101, 102, 103, 104, 105][:items]
    counts = read_item_counts(registry, version, manifest)
    assert counts is not None and counts.dtype == np.int64 and len(counts) == items + 1
    assert manifest.vocabulary == VocabularyRef("items.parquet", items)


@pytest.mark.parametrize("version", ["v000001", "v000002"])
def test_typed_manifest_writes_back_the_same_json(registry: Registry, version: str) -> None:
    on_disk = json.loads((registry.path(version) / MANIFEST).read_text())
    assert registry.manifest(version).to_json() == on_disk
    assert list(registry.manifest(version).to_json()) == list(on_disk)  # key order too
