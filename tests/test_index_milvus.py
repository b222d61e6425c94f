"""The Milvus index's own guarantees (the shared contract is in test_index.py): exact results,
the alias swap of a full reload, copy-on-write upserts, and the index_uri plumbing."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import typer

from recloop.cli import app
from recloop.errors import ConfigError, IndexUnavailable, ServingError
from recloop.serve.bundle import LoadOptions
from recloop.serve.indexes import milvus
from recloop.serve.indexes.base import probe_queries, recall_at_k
from recloop.serve.indexes.factory import build_index
from recloop.serve.indexes.milvus import MilvusIndex
from tests.test_index import DIM, NUM_ITEMS, K, Table, brute_force, clustered_table


@pytest.fixture(scope="module")
def table() -> Table:
    return clustered_table(NUM_ITEMS, DIM)


def test_milvus_is_exact_and_measures_its_recall(
    table: Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    queries = probe_queries(table, seed=7, count=32)
    rng = np.random.default_rng(2)
    exclude = [rng.choice(np.arange(1, NUM_ITEMS + 1), size=40) for _ in queries]
    index = build_index(table, "milvus", tune_queries=queries)
    try:
        assert isinstance(index, MilvusIndex) and index.kind == "milvus"
        assert index.recall == 1.0  # FLAT is exact; measured on the queries it was given
        truth, truth_scores = brute_force(table, queries, K, exclude)
        ids, scores = index.search(queries, K, exclude)
        assert np.array_equal(ids, truth)
        np.testing.assert_allclose(scores, truth_scores, rtol=1e-4, atol=1e-4)
        # Past Milvus's topk bound the exclusions go into the filter expression, row by row.
        monkeypatch.setattr(milvus, "MAX_TOPK", K + 5)
        assert np.array_equal(index.search(queries[:4], K, exclude[:4])[0], truth[:4])
    finally:
        index.close()


def test_milvus_ann_index_type_measures_what_it_gives_up(table: Table) -> None:
    """IVF_FLAT through milvus-lite (faiss): nlist and nprobe reach it, and recall says so."""
    queries = probe_queries(table, seed=7, count=32)
    truth, _ = brute_force(table, queries, K, [np.empty(0, np.int64)] * len(queries))
    params = {"nlist": 64}
    full = MilvusIndex(table, index_type="IVF_FLAT", index_params=params,
                       search_params={"nprobe": 64}, tune_queries=queries)  # fmt: skip
    one = MilvusIndex(table, index_type="IVF_FLAT", index_params=params,
                      search_params={"nprobe": 1}, tune_queries=queries)  # fmt: skip
    try:
        # Every list probed: exact up to faiss float ties; one list of 64: recall well below.
        assert full.index_type == "IVF_FLAT" and full.recall is not None and full.recall > 0.95
        assert recall_at_k(full.search(queries, K)[0], truth) > 0.95
        assert one.recall is not None and one.recall < 0.95  # measured: nlist reached faiss
    finally:
        full.close()
        one.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"index_type": "DISKANN"}, "index_type must be one of FLAT, IVF_FLAT"),
        ({"index_params": [("nlist", 4)]}, "index_params must be a dict"),
    ],
)
def test_milvus_bad_index_arguments(table: Table, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ServingError, match=message):
        MilvusIndex(table, **kwargs)  # type: ignore[arg-type]


def test_milvus_reload_swaps_the_alias_atomically(table: Table, tmp_path: Path) -> None:
    uri = str(tmp_path / "items.db")
    queries = probe_queries(table, seed=3, count=16)
    other = clustered_table(NUM_ITEMS, DIM, seed=9)
    truths = [brute_force(t, queries, K)[0] for t in (table, other)]
    first = MilvusIndex(table, uri=uri, alias="served")
    seen: list[int] = []  # which table each search matched (-1: neither: empty or half built)
    stop = threading.Event()

    def search_until_stopped() -> None:
        while not stop.is_set():
            ids, _ = first.search(queries, K)
            match = [i for i, truth in enumerate(truths) if np.array_equal(ids, truth)]
            seen.append(match[0] if match else -1)

    searcher = threading.Thread(target=search_until_stopped)
    searcher.start()
    try:
        second = MilvusIndex(other, uri=uri, alias="served")  # the full reload
        while 1 not in seen and -1 not in seen and searcher.is_alive():
            stop.wait(0.01)
    finally:
        stop.set()
        searcher.join()
    try:
        assert seen[0] == 0 and set(seen) <= {0, 1} and seen[-1] == 1, seen
        assert seen == sorted(seen), "once switched, never back"
        client = second._store.client
        assert not client.has_collection(first.collection), "the old collection was dropped"
        assert client.describe_alias("served")["collection_name"] == second.collection
        first.close()  # the old bundle's close leaves the alias to the new collection
        assert np.array_equal(second.search(queries, K)[0], truths[1])
    finally:
        first.close()
        second.close()


def test_milvus_updated_upserts_without_showing_new_items_to_the_old_index(table: Table) -> None:
    index = MilvusIndex(table)
    rng = np.random.default_rng(4)
    rows = (8.0 * rng.normal(size=(2, DIM))).astype(np.float32)  # large norm: own top-1
    newer = index.updated(np.array([5, NUM_ITEMS + 1]), rows)
    try:
        assert newer is not index and newer.collection == index.collection
        assert (index.num_items, newer.num_items) == (NUM_ITEMS, NUM_ITEMS + 1)
        assert newer.search(rows, 1)[0][:, 0].tolist() == [5, NUM_ITEMS + 1]
        assert index.search(rows[1:], K)[0].max() <= NUM_ITEMS, "old index: old ids only"
        np.testing.assert_allclose(newer.vectors([5, NUM_ITEMS + 1]), rows)
        index.close()  # the copy still holds the collection
        assert newer.search(rows, 1)[0][:, 0].tolist() == [5, NUM_ITEMS + 1]
    finally:
        index.close()
        newer.close()
    store = newer._store
    assert store.users == 0 and store.tmp is not None and not Path(store.tmp).exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"uri": "items.sqlite"}, r"index_uri \(--index-uri\) must be a Milvus server URI"),
        ({"uri": "/no/such/folder/items.db"}, r"index_uri \(--index-uri\): folder"),
        ({"uri": ""}, r"index_uri \(--index-uri\) must be a non-empty string"),
        ({"uri": "http://127.0.0.1:1"}, r"index_uri 'http://127.0.0.1:1': cannot connect"),
        ({"alias": "bad-name"}, "alias must be a Milvus name"),
        ({"shards": 2}, "a milvus index cannot be sharded"),
        ({"nprobe": 4}, "unknown option.*'milvus': nprobe"),
    ],
)
def test_milvus_bad_build_arguments(table: Table, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ServingError, match=message):
        build_index(table, "milvus", **kwargs)  # type: ignore[arg-type]


def test_index_uri_reaches_the_load_options_and_is_checked(tmp_path: Path) -> None:
    from recloop.cli.serve import _service_config

    uri = str(tmp_path / "items.db")
    # The serve command's own defaults (so the test follows new options), with Milvus chosen.
    command = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    defaults = {param.name: param.default for param in command.params}
    options = {
        **defaults, "index": "milvus", "index_uri": uri, "index_alias": "replica_1",
        "threads": 1, "registry": tmp_path,
    }  # fmt: skip
    config = _service_config(options)
    assert config.load.index == "milvus" and config.load.index_uri == uri
    assert config.load.index_alias == "replica_1"
    with pytest.raises(ConfigError, match=r"--index-uri\) applies to --index milvus or milvus-ivf"):
        LoadOptions(index="exact", index_uri=uri)
    with pytest.raises(ConfigError, match=r"index_uri \(--index-uri\): folder"):
        LoadOptions(index="milvus", index_uri="/no/such/folder/items.db")
    assert LoadOptions(index="milvus", index_uri="http://milvus:19530").index_uri


def test_milvus_failures_make_it_unavailable_until_a_probe_succeeds(
    table: Table, tmp_path: Path
) -> None:
    """What the service's /readyz reports: a failed search marks the index unavailable (with
    Milvus's reason), a probe that Milvus answers clears it. The failure here is real: the
    collection behind the alias is dropped by another client, then built again."""
    uri = str(tmp_path / "items.db")
    queries = probe_queries(table, seed=5, count=4)
    index = MilvusIndex(table, uri=uri, alias="served")
    try:
        assert index.unavailable() is None
        index._store.client.drop_alias("served")
        index._store.client.drop_collection(index.collection)
        with pytest.raises(IndexUnavailable, match="milvus search on 'served' failed"):
            index.search(queries, K)
        reason = index.unavailable()
        assert reason is not None and "served" in reason
        index.probe()  # still gone
        assert index.unavailable() is not None
        rebuilt = MilvusIndex(table, uri=uri, alias="served")  # e.g. an operator's restore
        try:
            index.probe()
            assert index.unavailable() is None
            assert np.array_equal(index.search(queries, K)[0], brute_force(table, queries, K)[0])
        finally:
            rebuilt.close()
    finally:
        index.close()


def test_milvus_ivf_tunes_nprobe_to_the_recall_target(table: Table) -> None:
    """--index milvus-ivf: IVF_FLAT with the in-process IVF's list count, nprobe doubled at
    build until recall@10 on the serving queries reaches min_recall, reported like IVF's."""
    from recloop.serve.bundle import index_details
    from recloop.serve.indexes.base import default_nlist, recall_at_k

    queries = probe_queries(table, seed=7, count=64)
    index = build_index(table, "milvus-ivf", min_recall=0.95, tune_queries=queries)
    try:
        assert isinstance(index, MilvusIndex) and index.index_type == "IVF_FLAT"
        nlist = default_nlist(NUM_ITEMS)
        assert index.index_params == {"nlist": nlist} and 1 <= index.nprobe <= nlist
        assert index.recall is not None and index.recall >= 0.95
        truth, _ = brute_force(table, queries, K)
        found = index.search(queries, K)[0]
        assert recall_at_k(found, truth) >= 0.95  # what the tuning claims, measured again
        assert index_details(index)["index_nprobe"] == index.nprobe
    finally:
        index.close()
