"""The service follows the registry by applying deltas to the served bundle (copy-on-write).

A tiny SASRec (300 items, dim 16) is published as v1, then deltas as the online learner writes
them: changed item rows, new items appended to the table and the vocabulary, a dense tensor
replaced, new item counts. Every applied bundle must answer like a full load of its version
and leave the bundle it came from exactly as it was.
"""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import polars as pl
import pytest
import torch

import recloop.serve.holder as holder_module
from recloop.data.vocabulary import Vocabulary
from recloop.errors import DatasetError, EngineParityError, ServingError
from recloop.models.factory import build_model, config_to_dict
from recloop.registry import Registry, RowUpdate
from recloop.registry.loading import load_model
from recloop.serve.app import ServiceConfig
from recloop.serve.bundle import LoadOptions, ModelBundle, load_bundle
from recloop.serve.delta import NotApplicable, patch_state
from recloop.serve.engines.base import InferenceEngine
from recloop.serve.engines.export import item_table, item_vectors
from recloop.serve.engines.parity import reference_queries
from recloop.serve.engines.torch import TorchEngine
from recloop.serve.holder import ModelHolder
from recloop.serve.indexes.base import exact_search, recall_at_k
from recloop.serve.indexes.factory import build_index
from tests.serving import running_service

NUM_ITEMS = 300
DIM = 16
MAX_LENGTH = 12
CONFIG: dict[str, Any] = {
    "num_items": NUM_ITEMS,
    "dim": DIM,
    "num_blocks": 1,
    "num_heads": 1,
    "max_length": MAX_LENGTH,
    "dropout": 0.0,
}
TABLE = "item_embedding.weight"
MIN_RECALL = 0.9  # IVF answers vs exact, as in test_serve's IVF service test


# ---------------------------------------------------------------------------- versions


def vocabulary(items: int) -> bytes:
    raw = [f"item-{i}" for i in range(1, NUM_ITEMS + 1)]
    raw += [f"new-{i}" for i in range(1, items - NUM_ITEMS + 1)]
    buffer = io.BytesIO()
    pl.DataFrame({"id": np.arange(1, items + 1), "raw": raw}).write_parquet(buffer)
    return buffer.getvalue()


def item_counts(items: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(seed).integers(0, 100, size=items + 1))
    return buffer.getvalue()


def publish_base(registry: Registry, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = build_model("sasrec", dict(CONFIG))
    return registry.publish(
        {name: tensor.detach() for name, tensor in model.state_dict().items()},
        model=config_to_dict(model),
        extra_files={
            "items.parquet": vocabulary(NUM_ITEMS),
            "item_counts.npy": item_counts(NUM_ITEMS, 0),
        },
        vocabulary_file="items.parquet",
    )


def publish_delta(
    registry: Registry, parent: str, *, changed: int, new: int, dense: bool, seed: int
) -> str:
    """A delta like the learner's: `changed` existing rows moved, `new` items appended (rows
    with a large norm, so each is the top answer for its own direction), maybe dense tensors
    replaced, and new item counts."""
    items = int(registry.manifest(parent).to_json()["model"]["num_items"])
    g = torch.Generator().manual_seed(seed)
    rows = 1 + torch.randperm(items, generator=g)[:changed]
    values = 0.05 * torch.randn(changed, DIM, generator=g)
    fresh = 3.0 * torch.nn.functional.normalize(torch.randn(new, DIM, generator=g), dim=1)
    update = RowUpdate(
        torch.cat([rows, torch.arange(items + 1, items + 1 + new)]), torch.cat([values, fresh])
    )
    changes: dict[str, torch.Tensor | RowUpdate] = {TABLE: update}
    if dense:  # a Linear's weight too: ONNX Runtime folds its transpose at load
        changes["final_norm.weight"] = 1.0 + 0.3 * torch.randn(DIM, generator=g)
        changes["blocks.0.ffn.up.weight"] = 0.2 * torch.randn(DIM, DIM, generator=g)
    extra = {"item_counts.npy": item_counts(items + new, seed)}
    if new:
        extra["items.parquet"] = vocabulary(items + new)
    return registry.publish_delta(
        parent,
        changes,
        model={"type": "sasrec", **CONFIG, "num_items": items + new},
        extra_files=extra,
        vocabulary_file="items.parquet" if new else None,
        method="online",
    )


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """v1 full; v2 = v1 + 30 rows, 3 new items, 2 dense tensors; v3 = v2 + 10 rows, 2 new
    items (a chain); v4 = v1 + 20 rows (a sibling of v2: another lineage)."""
    root = tmp_path_factory.mktemp("delta")
    registry = Registry(root / "registry")
    v1 = publish_base(registry)
    v2 = publish_delta(registry, v1, changed=30, new=3, dense=True, seed=2)
    v3 = publish_delta(registry, v2, changed=10, new=2, dense=False, seed=3)
    v4 = publish_delta(registry, v1, changed=20, new=0, dense=False, seed=4)
    return {"root": root, "registry": registry, "v1": v1, "v2": v2, "v3": v3, "v4": v4}


def options(versions: dict[str, Any], **overrides: Any) -> LoadOptions:
    values: dict[str, Any] = {
        "engine": "onnx",
        "index": "exact",
        "cache_dir": versions["root"] / "onnx-cache",  # one export per version for the module
        "max_batch": 8,
        "min_recall": 0.95,
    }
    values.update(overrides)
    return LoadOptions(**values)


def holder_at(versions: dict[str, Any], version: str, **overrides: Any) -> ModelHolder:
    holder = ModelHolder(versions["registry"], options(versions, **overrides), version)
    holder.load()
    return holder


def sequences(num_items: int, seed: int = 0, count: int = 24) -> list[npt.NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(1, num_items + 1, size=int(rng.integers(1, MAX_LENGTH + 4)), dtype=np.int64)
        for _ in range(count)
    ]


def encode(bundle: ModelBundle, batch: list[npt.NDArray[np.int64]]) -> npt.NDArray[np.float32]:
    return np.array(bundle.engine.encode(batch))  # a copy: encode returns a reused buffer


def reference(registry: Registry, version: str) -> Any:
    model, _ = load_model(registry, version)
    return model


# ---------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("engine", ["onnx", "torch"])
@pytest.mark.parametrize("index", ["exact", "ivf"])
def test_an_applied_delta_answers_like_a_full_load(
    versions: dict[str, Any], engine: str, index: str
) -> None:
    registry, v2 = versions["registry"], versions["v2"]
    # No background rebuild here (33 of 303 items moved): the applied index is under test.
    holder = holder_at(versions, versions["v1"], engine=engine, index=index, rebuild_drift=1.0)
    applied, previous = holder.load(v2)
    full = load_bundle(registry, v2, options(versions, engine=engine, index=index))

    assert previous == versions["v1"] and holder.current is applied
    details = applied.describe()
    assert details["applied_delta"] is True and details["delta_from"] == versions["v1"]
    assert details["new_items"] == 3 and details["changed_item_rows"] == 33
    assert details["changed_tensors"] == ["blocks.0.ffn.up.weight", "final_norm.weight", TABLE]
    assert details["loaded_in_seconds"] == round(applied.load_seconds, 3) >= 0
    assert "applied_delta" not in full.details

    batch = sequences(NUM_ITEMS + 3)  # new items in the histories too
    queries = encode(applied, batch)
    np.testing.assert_allclose(queries, encode(full, batch), atol=1e-5, rtol=1e-4)
    assert applied.catalog.raw_strings(np.arange(1, NUM_ITEMS + 4)) == full.catalog.raw_strings(
        np.arange(1, NUM_ITEMS + 4)
    )
    np.testing.assert_array_equal(applied.popular, full.popular)

    found, _ = applied.index.search(queries, 10)
    if index == "exact":
        expected, _ = full.index.search(queries, 10)
        np.testing.assert_array_equal(found, expected)
    else:  # approximate: against the exact answers of the full load's table
        truth, _ = exact_search(item_table(full.model), queries, 10)
        assert recall_at_k(found, truth) >= MIN_RECALL


def test_a_delta_upserts_into_the_served_milvus_collection(versions: dict[str, Any]) -> None:
    holder = holder_at(versions, versions["v1"], engine="torch", index="milvus")
    served = holder.current
    assert served is not None and served.details["index_recall_at_10"] >= 0.99
    applied, _ = holder.load(versions["v2"])
    try:
        assert applied.details["applied_delta"] is True and applied.index.kind == "milvus"
        assert applied.index.num_items == NUM_ITEMS + 3 == served.index.num_items + 3
        queries = encode(applied, sequences(NUM_ITEMS + 3))
        found, _ = applied.index.search(queries, 10)
        truth, _ = exact_search(item_table(applied.model), queries, 10)
        # FLAT is exact; Milvus's float sums may only swap near-ties at the cut.
        assert recall_at_k(found, truth) >= 0.99
        assert served.index.search(queries, 10)[0].max() <= NUM_ITEMS  # never a new item
    finally:
        served.close()
        applied.close()


def test_a_chain_of_deltas_is_applied_at_once(versions: dict[str, Any]) -> None:
    registry = versions["registry"]
    holder = holder_at(versions, versions["v1"], engine="torch")
    bundle, _ = holder.load(versions["v3"])  # v2 and v3 in one step
    assert bundle.details["deltas_applied"] == 2 and bundle.catalog.num_items == NUM_ITEMS + 5
    model = reference(registry, versions["v3"])
    batch = sequences(NUM_ITEMS + 5, seed=1)
    queries = encode(bundle, batch)
    np.testing.assert_allclose(queries, reference_queries(model, batch), atol=1e-5, rtol=1e-4)
    expected, _ = exact_search(item_table(model), queries, 10)
    np.testing.assert_array_equal(bundle.index.search(queries, 10)[0], expected)


def test_new_items_become_recommendable(versions: dict[str, Any]) -> None:
    holder = holder_at(versions, versions["v1"])
    bundle, _ = holder.load(versions["v2"])
    new = np.arange(NUM_ITEMS + 1, NUM_ITEMS + 4)
    assert bundle.model is not None
    ids, _ = bundle.index.search(item_vectors(bundle.model, new), 1)
    assert ids[:, 0].tolist() == new.tolist()
    dense, unknown = bundle.catalog.lookup(["new-1", "new-3", "item-5"])
    assert dense.tolist() == [NUM_ITEMS + 1, NUM_ITEMS + 3, 5] and unknown == []
    assert bundle.catalog.raw_strings(new) == ["new-1", "new-2", "new-3"]
    assert encode(bundle, [new]).shape == (1, DIM)  # the ONNX graph takes the grown table


def test_the_bundle_a_delta_is_applied_to_is_untouched(versions: dict[str, Any]) -> None:
    holder = holder_at(versions, versions["v1"])
    old = holder.current
    assert old is not None
    batch = sequences(NUM_ITEMS, seed=2)
    queries = encode(old, batch)
    answers = old.index.search(queries, 10)
    state = {name: tensor.clone() for name, tensor in old.state.items()}
    popular = old.popular.copy()

    holder.load(versions["v2"])

    np.testing.assert_array_equal(encode(old, batch), queries)
    for got, expected in zip(old.index.search(queries, 10), answers, strict=True):
        np.testing.assert_array_equal(got, expected)
    assert old.state.keys() == state.keys()
    assert all(torch.equal(old.state[name], tensor) for name, tensor in state.items())
    assert old.index.num_items == old.catalog.num_items == old.engine.num_items == NUM_ITEMS
    assert old.catalog.lookup(["new-1"])[1] == ["new-1"]
    np.testing.assert_array_equal(old.popular, popular)
    with pytest.raises(ServingError, match=r"outside 1\.\.300"):
        old.engine.encode([np.array([NUM_ITEMS + 1])])


def test_other_lineages_load_in_full(
    versions: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    registry = versions["registry"]
    holder = holder_at(versions, versions["v1"], engine="torch")
    holder.load(versions["v2"])
    with caplog.at_level(logging.INFO, logger="recloop.serve"):
        sibling, previous = holder.load(versions["v4"])  # a delta of v1, not of v2
    assert previous == versions["v2"] and "applied_delta" not in sibling.details
    assert f"loading {versions['v4']} in full" in caplog.text
    model = reference(registry, versions["v4"])
    batch = sequences(NUM_ITEMS, seed=3)
    queries = encode(sibling, batch)
    np.testing.assert_allclose(queries, reference_queries(model, batch), atol=1e-5, rtol=1e-4)
    expected, _ = exact_search(item_table(model), queries, 10)
    np.testing.assert_array_equal(sibling.index.search(queries, 10)[0], expected)

    back, _ = holder.load(versions["v1"])  # an ancestor: not reachable by deltas either
    assert back.version == versions["v1"] and "applied_delta" not in back.details


@pytest.mark.parametrize(
    ("version", "problem"),
    [("v2", "fails on the parity check"), ("v4", "disagrees with the torch model")],
)
def test_a_delta_that_fails_the_parity_check_is_refused(
    versions: dict[str, Any], monkeypatch: pytest.MonkeyPatch, version: str, problem: str
) -> None:
    holder = holder_at(versions, versions["v1"], engine="torch")
    old = holder.current

    def stale(self: TorchEngine, model: Any, changed: Any, *, label: str) -> InferenceEngine:
        return self  # the old weights: what a substitution that did not happen would serve

    monkeypatch.setattr(TorchEngine, "with_weights", stale)
    # v2 adds items, which the stale engine refuses; v4 only moves rows, which it gets wrong.
    with pytest.raises(EngineParityError, match=f"engine for {versions[version]} {problem}"):
        holder.load(versions[version])
    assert holder.current is old and holder.last_error is not None


# ---------------------------------------------------------------------------- IVF rebuild


def test_a_drifted_ivf_index_is_rebuilt_in_the_background(versions: dict[str, Any]) -> None:
    holder = holder_at(versions, versions["v1"], engine="torch", index="ivf", rebuild_drift=0.05)
    applied, _ = holder.load(versions["v2"])  # 33 of 303 items moved: drift 0.11
    assert applied.index.drift() > 0.05
    assert holder._rebuilding is not None
    holder._rebuilding.join(timeout=60)
    rebuilt = holder.current
    assert rebuilt is not None and rebuilt is not applied and rebuilt.version == versions["v2"]
    assert rebuilt.index.drift() == 0.0 and "index_rebuilt_seconds" in rebuilt.details
    assert rebuilt.engine is applied.engine and rebuilt.catalog is applied.catalog
    assert_answers_like_exact(rebuilt)


def test_a_rebuilt_index_catches_up_with_newer_deltas(
    versions: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = holder_at(versions, versions["v1"], engine="torch", index="ivf", rebuild_drift=0.05)
    release = threading.Event()
    build = holder_module.index_for

    def held_back(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "recloop-index-rebuild":
            assert release.wait(timeout=60)
        return build(*args, **kwargs)

    monkeypatch.setattr(holder_module, "index_for", held_back)
    holder.load(versions["v2"])  # starts the rebuild for v2, which waits
    newer, _ = holder.load(versions["v3"])  # meanwhile the service moves on
    release.set()
    assert holder._rebuilding is not None
    holder._rebuilding.join(timeout=60)
    current = holder.current
    assert current is not None and current is not newer and current.version == versions["v3"]
    assert "index_rebuilt_seconds" in current.details
    assert current.index.num_items == NUM_ITEMS + 5 and current.index.drift() < 0.05
    assert_answers_like_exact(current)


def assert_answers_like_exact(bundle: ModelBundle) -> None:
    assert bundle.model is not None
    table = item_table(bundle.model)
    queries = encode(bundle, sequences(bundle.catalog.num_items, seed=5))
    truth, _ = exact_search(table, queries, 10)
    assert recall_at_k(bundle.index.search(queries, 10)[0], truth) >= MIN_RECALL
    new = np.arange(NUM_ITEMS + 1, bundle.catalog.num_items + 1)
    ids, _ = bundle.index.search(item_vectors(bundle.model, new), 1)
    assert ids[:, 0].tolist() == new.tolist()


# ---------------------------------------------------------------------------- memory


def test_replaced_bundles_are_freed_without_the_cyclic_collector(
    versions: dict[str, Any],
) -> None:
    """The service gc.freeze()s after a swap: a bundle that only the cyclic collector could
    free would then never be freed, and deltas come every few seconds."""
    holder = holder_at(versions, versions["v1"])
    gc.collect()
    gc.disable()
    try:
        first, _ = holder.load(versions["v2"])
        engine, index = weakref.ref(first.engine), weakref.ref(first.index)
        del first
        holder.load(versions["v3"])
        assert engine() is None and index() is None
    finally:
        gc.enable()


# ---------------------------------------------------------------------------- parts


def test_patching_a_state_never_writes_the_base() -> None:
    base = {TABLE: torch.zeros(4, 2), "dense": torch.ones(2)}
    frozen = {name: tensor.clone() for name, tensor in base.items()}
    deltas = [  # a chain: rows 4 and 5 grow the table, row 1 and 2 change
        ("v2", {TABLE: RowUpdate(torch.tensor([1, 4]), torch.full((2, 2), 2.0))}, []),
        ("v3", {TABLE: RowUpdate(torch.tensor([5, 2]), torch.full((2, 2), 3.0))}, []),
    ]
    patched = patch_state(base, deltas)
    assert all(torch.equal(base[name], tensor) for name, tensor in frozen.items())
    assert patched.state["dense"] is base["dense"]  # untouched tensors are shared
    assert patched.state[TABLE][:, 0].tolist() == [0.0, 2.0, 3.0, 0.0, 2.0, 3.0]
    assert patched.changed == {TABLE}
    assert patched.table_rows is not None and patched.table_rows.tolist() == [1, 2, 4, 5]
    holes = [("v4", {TABLE: RowUpdate(torch.tensor([6]), torch.ones(1, 2))}, [])]
    with pytest.raises(
        NotApplicable, match=r"from 4 to 7 rows without writing every one of rows 4\.\.6"
    ):
        patch_state(base, holes)


@pytest.mark.parametrize(
    "make",
    [
        lambda t: build_index(t, "exact"),
        lambda t: build_index(t, "exact-int8"),
        lambda t: build_index(t, "exact", shards=3),
        lambda t: build_index(t, "ivf", nlist=4, nprobe=4),
    ],
    ids=["exact", "exact-int8", "sharded", "ivf"],
)
def test_index_updates_are_copy_on_write(make: Callable[[np.ndarray], Any]) -> None:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((201, 8)).astype(np.float32)
    table[0] = 0
    index = make(table)
    rows = np.array([3, 150, 201, 202])
    vectors = 5 * rng.standard_normal((4, 8)).astype(np.float32)
    updated = index.updated(rows, vectors)
    assert updated is not index and updated.num_items == 202 and index.num_items == 200
    np.testing.assert_allclose(updated.vectors(rows), vectors, atol=0.05)
    np.testing.assert_allclose(index.vectors(rows[:2]), table[rows[:2]], atol=0.05)
    assert updated.search(vectors, 1)[0][:, 0].tolist() == rows.tolist()
    assert index.updated([], np.zeros((0, 8))) is index


def test_a_catalogue_extends_only_by_appending(tmp_path: Path) -> None:
    first = tmp_path / "first.parquet"
    first.write_bytes(vocabulary(NUM_ITEMS))
    catalog = Vocabulary.read(first)
    grown = tmp_path / "grown.parquet"
    grown.write_bytes(vocabulary(NUM_ITEMS + 2))
    extended = catalog.extended(grown)
    assert extended.num_items == NUM_ITEMS + 2 and catalog.num_items == NUM_ITEMS
    assert extended.lookup(["new-2", "item-7"])[0].tolist() == [NUM_ITEMS + 2, 7]
    assert catalog.lookup(["new-2"])[1] == ["new-2"]
    np.testing.assert_array_equal(extended.raw_by_id, Vocabulary.read(grown).raw_by_id)
    shuffled = tmp_path / "shuffled.parquet"
    raw = [f"item-{i}" for i in range(NUM_ITEMS, 0, -1)]
    pl.DataFrame({"id": np.arange(1, NUM_ITEMS + 1), "raw": raw}).write_parquet(shuffled)
    with pytest.raises(DatasetError, match="renumbered"):
        catalog.extended(shuffled)

    # Integer raw ids, then a new raw id that is not a number: the learner writes text.
    numbers, text = tmp_path / "numbers.parquet", tmp_path / "text.parquet"
    pl.DataFrame({"id": [1, 2], "raw": [10, 20]}).write_parquet(numbers)
    pl.DataFrame({"id": [1, 2, 3], "raw": ["10", "20", "sku-3"]}).write_parquet(text)
    mixed = Vocabulary.read(numbers).extended(text)
    assert mixed.lookup(["sku-3", "10"])[0].tolist() == [3, 1]
    assert mixed.to_dense(np.array(["sku-3"], dtype=object)).tolist() == [3]


# ---------------------------------------------------------------------------- HTTP


def test_the_service_follows_deltas_without_a_failed_request(
    versions: dict[str, Any], tmp_path: Path
) -> None:
    registry_dir = tmp_path / "registry"
    registry = Registry(registry_dir)
    base = publish_base(registry)  # the weights of the module's v1: its ONNX export is cached
    config = ServiceConfig(
        registry=registry_dir,
        ref="latest",
        load=options(versions),
        follow_seconds=0.05,
        cache=False,
    )
    with running_service(config) as url:
        seen, statuses, details = asyncio.run(_requests_while_a_delta_lands(url, registry, base))
    assert set(statuses) == {200}, statuses
    assert seen[base] > 0 and sum(seen.values()) > seen[base]
    assert details["applied_delta"] is True and details["new_items"] == 3


async def _requests_while_a_delta_lands(
    url: str, registry: Registry, base: str
) -> tuple[dict[str, int], list[int], dict[str, Any]]:
    seen: dict[str, int] = {}
    statuses: list[int] = []
    landed = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:

        async def ask(worker: int) -> None:
            after = 0
            while after < 10:
                items = [f"item-{worker + 1}", "new-1" if landed.is_set() else "item-3"]
                response = await http.post("/v1/recommendations", json={"items": items, "k": 5})
                statuses.append(response.status_code)
                if response.status_code == 200:
                    body = response.json()
                    seen[body["model_version"]] = seen.get(body["model_version"], 0) + 1
                    if landed.is_set():
                        assert body["unknown_items"] == []  # new-1 is known from now on
                        after += 1
                await asyncio.sleep(0)

        async def publish() -> dict[str, Any]:
            await asyncio.sleep(0.2)
            delta = publish_delta(registry, base, changed=30, new=3, dense=True, seed=2)
            for _ in range(600):
                model = (await http.get("/v1/model")).json()
                if model["version"] == delta:
                    landed.set()
                    details: dict[str, Any] = model["details"]
                    return details
                await asyncio.sleep(0.05)
            raise AssertionError(f"the service never served {delta}")

        results = await asyncio.gather(publish(), *(ask(w) for w in range(4)))
    return seen, statuses, results[0]


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """Torch engines set the process-wide thread count; give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
