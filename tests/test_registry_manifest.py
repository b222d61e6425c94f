"""The typed manifest: what it refuses (naming the field and the file) and what it writes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from recloop.errors import RegistryError
from recloop.registry import MANIFEST, Registry
from recloop.registry.manifest import DeltaSpec, TensorMeta

FIXTURE = Path(__file__).parent / "fixtures" / "registry-v1"
Edit = Callable[[dict[str, Any]], None]


def _bad_tensor(m: dict[str, Any]) -> None:
    m["tensors"]["item_embedding.weight"]["shape"] = "6x8"


def _bad_mode(m: dict[str, Any]) -> None:
    m["delta"]["item_embedding.weight"]["mode"] = "xor"


def _bad_rows(m: dict[str, Any]) -> None:
    del m["delta"]["item_embedding.weight"]["rows"]


def _bad_vocabulary(m: dict[str, Any]) -> None:
    m["vocabulary"] = {"items": 5}


def _bad_parent(m: dict[str, Any]) -> None:
    m["kind"], m["parent"] = "full", 7


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (_bad_tensor, r"bad 'tensors' entry for 'item_embedding.weight'"),
        (_bad_mode, r"unknown delta mode 'xor' for tensor 'item_embedding.weight'"),
        (_bad_rows, r"bad 'delta' entry for 'item_embedding.weight'"),
        (_bad_vocabulary, r"bad 'vocabulary'"),
        (_bad_parent, r"bad 'parent' \(expected a string or null\)"),
    ],
)
def test_a_bad_field_is_one_error_naming_field_and_file(
    tmp_path: Path, edit: Edit, reason: str
) -> None:
    shutil.copytree(FIXTURE, tmp_path / "registry")
    registry = Registry(tmp_path / "registry", create=False)
    path = registry.path("v000002") / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(RegistryError, match=rf"version v000002: .*{reason}") as caught:
        registry.manifest("v000002")
    assert str(path) in str(caught.value)
    assert [info.status.split(":")[0] for info in registry.list()] == ["ok", "broken"]


def test_fields_are_typed() -> None:
    registry = Registry(FIXTURE, create=False)  # read only
    delta = registry.manifest("v000002")
    assert delta.is_delta and (delta.base, delta.chain_depth) == ("v000001", 1)
    assert delta.tensors["item_embedding.weight"] == TensorMeta("float32", (6, 8))
    spec = delta.delta["item_embedding.weight"] if delta.delta else None
    assert spec == DeltaSpec("rows", "item_embedding.weight.rows", 2, (6, 8))
    assert delta.removed == () and delta.model_type == "sasrec"
    full = registry.manifest("v000001")
    assert not full.is_delta and full.base is None and full.delta is None
    assert (
        full.files["items.parquet"].bytes
        == (FIXTURE / "versions/v000001/items.parquet").stat().st_size
    )
    assert "delta" not in full.to_json() and "base" not in full.to_json()
