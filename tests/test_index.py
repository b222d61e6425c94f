"""Item indexes: one contract for every implementation, then each one's own guarantees."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt
import pytest

from recloop.errors import ServingError
from recloop.serve.indexes.base import ItemIndex, exact_search, measure_recall
from recloop.serve.indexes.exact import ExactIndex
from recloop.serve.indexes.factory import build_index
from recloop.serve.indexes.ivf import IVFIndex, probe_queries
from recloop.serve.indexes.milvus import MilvusIndex
from recloop.serve.indexes.sharded import ShardedIndex, split_table

Table = npt.NDArray[np.float32]
Factory = Callable[[Table], ItemIndex]
NUM_ITEMS, DIM, K = 2000, 16, 10


def clustered_table(num_items: int, dim: int, clusters: int = 40, seed: int = 0) -> Table:
    """Items around random centres (so IVF lists mean something); row 0 is padding."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    rows = centres[rng.integers(0, clusters, num_items)] + 0.35 * rng.normal(size=(num_items, dim))
    return np.concatenate([np.zeros((1, dim)), rows]).astype(np.float32)


@pytest.fixture(scope="module")
def table() -> Table:
    return clustered_table(NUM_ITEMS, DIM)


@pytest.fixture(scope="module")
def queries(table: Table) -> Table:
    return probe_queries(table, seed=7, count=64)


def brute_force(
    table: Table, queries: Table, k: int, exclude: list[npt.NDArray[np.int64]] | None = None
) -> tuple[npt.NDArray[np.int64], Table]:
    """The reference: full score matrix, exclusions at -inf, argsort."""
    scores = queries.astype(np.float64) @ table[1:].T.astype(np.float64)
    for row, ids in enumerate(exclude or []):
        scores[row, ids - 1] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order + 1, np.take_along_axis(scores, order, axis=1).astype(np.float32)


IMPLEMENTATIONS: dict[str, Factory] = {
    "exact": lambda t: ExactIndex(t, block_rows=300),  # several blocks, one partial
    "exact-int8": lambda t: ExactIndex(t, quantize="int8", block_rows=300),
    "exact-int8-approx": lambda t: ExactIndex(t, quantize="int8", rerank=False),
    "ivf": lambda t: IVFIndex(t, min_recall=0.95),
    "sharded-exact": lambda t: build_index(t, "exact", shards=3),
    "sharded-ivf": lambda t: build_index(t, "ivf", shards=2, min_recall=0.9),
    "milvus": MilvusIndex,  # milvus-lite in a temporary folder the index owns
    "milvus-ivf": lambda t: build_index(t, "milvus-ivf", min_recall=0.95),
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def make(request: pytest.FixtureRequest) -> Iterator[Factory]:
    """Builds indexes of one implementation and closes all of them after the test."""
    built: list[ItemIndex] = []

    def factory(table: Table) -> ItemIndex:
        built.append(IMPLEMENTATIONS[request.param](table))
        return built[-1]

    yield factory
    for index in built:
        index.close()


# --------------------------------------------------------------------------- the contract


def test_contract_search_ranks_and_excludes(make: Factory, table: Table, queries: Table) -> None:
    index = make(table)
    truth, _ = brute_force(table, queries, K)
    # Exclude each row's 3 best items, plus ids the index must ignore (padding, out of range).
    exclude: list[npt.NDArray[np.int64] | None] = [
        np.concatenate([row[:3], [0, -5, NUM_ITEMS + 99]]) for row in truth
    ]
    exclude[1] = None
    ids, scores = index.search(queries, K, exclude)

    assert ids.shape == scores.shape == (len(queries), K)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    assert (ids >= 1).all() and (ids <= NUM_ITEMS).all(), "never id 0 while items are eligible"
    assert (np.diff(scores, axis=1) <= 0).all(), "best first"
    for row, excluded in enumerate(exclude):
        if excluded is not None:
            assert not np.isin(ids[row], excluded).any()
        assert len(set(ids[row].tolist())) == K
    # Scores are inner products with the rows the index reports for those ids.
    rows = index.vectors(ids.ravel()).reshape(*ids.shape, DIM)
    np.testing.assert_allclose(scores, np.einsum("bd,bkd->bk", queries, rows), rtol=1e-4, atol=1e-4)


def test_contract_vectors_round_trip(make: Factory, table: Table) -> None:
    index = make(table)
    ids = np.array([1, 2, 777, NUM_ITEMS, 5, 5])
    vectors = index.vectors(ids)
    assert vectors.shape == (len(ids), DIM) and vectors.dtype == np.float32
    # Exact up to int8 quantisation (|error| <= scale / 2 = max|row| / 254) for the approx kind.
    tolerance = np.abs(table[ids]).max(axis=1, keepdims=True) / 254 + 1e-6
    assert (np.abs(vectors - table[ids]) <= tolerance).all()
    assert index.num_items == NUM_ITEMS and index.dim == DIM and index.memory_bytes() > 0


def test_contract_pads_when_few_items_are_eligible(make: Factory) -> None:
    tiny = clustered_table(6, DIM, clusters=2, seed=3)
    index = make(tiny)
    query = tiny[2:3] + 0.01
    ids, scores = index.search(query, K, [np.array([2, 4])])
    assert sorted(ids[0, :4].tolist()) == [1, 3, 5, 6]
    assert (ids[0, 4:] == 0).all() and np.isneginf(scores[0, 4:]).all()
    assert np.isfinite(scores[0, :4]).all()


def test_contract_add_new_and_updated_items(make: Factory, table: Table) -> None:
    index = make(table.copy())
    rng = np.random.default_rng(11)
    new = (8.0 * rng.normal(size=(3, DIM))).astype(np.float32)  # large norm: own top-1
    index.add(np.arange(NUM_ITEMS + 1, NUM_ITEMS + 4), new)
    assert index.num_items == NUM_ITEMS + 3
    ids, _ = index.search(new, 1)
    assert ids[:, 0].tolist() == [NUM_ITEMS + 1, NUM_ITEMS + 2, NUM_ITEMS + 3]

    updated = (8.0 * rng.normal(size=(2, DIM))).astype(np.float32)
    index.add(np.array([7, NUM_ITEMS + 2]), updated)
    ids, _ = index.search(updated, 1)
    assert ids[:, 0].tolist() == [7, NUM_ITEMS + 2]
    quantisation = np.abs(updated[0]).max() / 254 + 1e-6  # the int8 kind without re-rank
    assert np.abs(index.vectors(np.array([7]))[0] - updated[0]).max() <= quantisation
    assert index.num_items == NUM_ITEMS + 3
    ids, _ = index.search(updated[:1], 5, [np.array([7])])
    assert 7 not in ids[0]


# --------------------------------------------------------------------------- per implementation


def test_exact_equals_brute_force() -> None:
    rng = np.random.default_rng(1)
    table = np.concatenate([np.zeros((1, 24)), rng.normal(size=(3000, 24))]).astype(np.float32)
    queries = rng.normal(size=(40, 24)).astype(np.float32)
    exclude = [rng.choice(np.arange(1, 3001), size=int(rng.integers(0, 50))) for _ in queries]
    truth_ids, truth_scores = brute_force(table, queries, 25, exclude)
    for block_rows in (7, 1000, None):
        ids, scores = ExactIndex(table, block_rows=block_rows).search(queries, 25, exclude)
        assert np.array_equal(ids, truth_ids), block_rows
        np.testing.assert_allclose(scores, truth_scores, rtol=1e-5, atol=1e-5)
    # Read-only inputs (a memory-mapped table, a frozen query buffer) score the same: torch
    # cannot wrap them, so the scorer copies instead of failing.
    table.flags.writeable = False
    queries.flags.writeable = False
    ids, scores = exact_search(table, queries, 25, exclude)
    assert np.array_equal(ids, truth_ids)
    np.testing.assert_allclose(scores, truth_scores, rtol=1e-5, atol=1e-5)


def test_int8_rerank_recall_and_memory(table: Table, queries: Table) -> None:
    exact = ExactIndex(table)
    reranked = ExactIndex(table, quantize="int8")
    approx = ExactIndex(table, quantize="int8", rerank=False)
    assert reranked.kind == approx.kind == "exact-int8"
    assert measure_recall(reranked, exact, queries) >= 0.99
    assert measure_recall(approx, exact, queries) >= 0.95
    # Re-ranked scores are exact float32 inner products; the approximate ones are close.
    ids, scores = reranked.search(queries, K)
    np.testing.assert_allclose(scores, np.einsum("bd,bkd->bk", queries, table[ids]), rtol=1e-5)
    ids, scores = approx.search(queries, K)
    exact_scores = np.einsum("bd,bkd->bk", queries, table[ids])
    assert np.abs(scores - exact_scores).max() < 0.02 * np.abs(exact_scores).max()
    # Documented memory: codes + scales alone are (dim + 4) / (4 dim) of float32; re-rank adds
    # the float32 rows back.
    float_bytes = exact.memory_bytes()
    assert approx.memory_bytes() == (NUM_ITEMS + 1) * (DIM + 4) < 0.35 * float_bytes
    assert reranked.memory_bytes() == float_bytes + approx.memory_bytes()


def test_ivf_meets_min_recall_and_tunes_nprobe(table: Table) -> None:
    exact = ExactIndex(table)
    fresh = probe_queries(table, seed=99)  # not the build's own probe queries
    loose = IVFIndex(table, min_recall=0.5)
    strict = IVFIndex(table, min_recall=0.95)
    assert strict.recall is not None and strict.recall >= 0.95
    assert strict.measure_recall(exact, fresh) >= 0.95
    assert strict.nprobe > loose.nprobe and strict.nprobe <= strict.nlist
    assert 1 < strict.nlist <= NUM_ITEMS // 39
    assert IVFIndex(table).recall is None  # measured only when asked for


def test_ivf_tunes_recall_on_the_queries_it_is_given(table: Table) -> None:
    # Serving passes encoded user histories: the recall promised is measured on them.
    rng = np.random.default_rng(5)
    hard = rng.standard_normal((64, DIM)).astype(np.float32)  # unlike any cluster centre
    index = IVFIndex(table, min_recall=0.9, tune_queries=hard)
    exact = ExactIndex(table)
    assert index.recall is not None and index.recall >= 0.9
    assert index.measure_recall(exact, hard) == pytest.approx(index.recall)
    easy = IVFIndex(table, min_recall=0.9)  # perturbed rows: easier, fewer lists suffice
    assert easy.nprobe <= index.nprobe


def test_ivf_tiny_table_is_one_list_and_exact() -> None:
    tiny = clustered_table(50, DIM, seed=4)
    index = IVFIndex(tiny, min_recall=0.99)
    assert index.nlist == 1 and index.recall == 1.0
    queries = probe_queries(tiny, seed=1)
    assert np.array_equal(index.search(queries, 5)[0], brute_force(tiny, queries, 5)[0])


def test_ivf_long_exclusion_lists_still_fill_k(table: Table, queries: Table) -> None:
    index = IVFIndex(table, nprobe=51)  # every list: exclusions are the only difference
    truth, _ = brute_force(table, queries[:4], 300)
    exclude = [row[:290] for row in truth]
    ids, _ = index.search(queries[:4], K, exclude)
    assert np.array_equal(ids, truth[:, 290:])


@pytest.mark.parametrize("shards", [2, 3, 7])
def test_sharded_exact_equals_exact(table: Table, queries: Table, shards: int) -> None:
    rng = np.random.default_rng(shards)
    exclude = [rng.choice(np.arange(1, NUM_ITEMS + 1), size=100) for _ in queries]
    sharded = build_index(table, "exact", shards=shards)
    try:
        assert isinstance(sharded, ShardedIndex) and sharded.kind == "sharded"
        assert sharded.offsets[1] == NUM_ITEMS // shards and sharded.recall is None
        expected = ExactIndex(table).search(queries, 50, exclude)
        ids, scores = sharded.search(queries, 50, exclude)
        assert np.array_equal(ids, expected[0])
        np.testing.assert_allclose(scores, expected[1], rtol=1e-6)
    finally:
        sharded.close()


def test_sharded_ivf_reports_the_worst_shard_recall(table: Table) -> None:
    sharded = build_index(table, "ivf", shards=2, min_recall=0.9)
    try:
        assert isinstance(sharded, ShardedIndex)
        recalls = [shard.recall for shard in sharded.shards]
        assert sharded.recall == min(r for r in recalls if r is not None) >= 0.9
    finally:
        sharded.close()


def test_sharded_rejects_gapped_offsets(table: Table) -> None:
    parts = [ExactIndex(part) for _, part in split_table(table, 2)]
    with pytest.raises(ServingError, match="offsets must make contiguous id ranges"):
        ShardedIndex(parts, offsets=[0, 5])


# --------------------------------------------------------------------------- bad parameters


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda i, q: i.search(q, 0), "k must be >= 1, got 0"),
        (lambda i, q: i.search(q[:, :5], 3), "queries have dim 5 but the index has dim 16"),
        (lambda i, q: i.search(q[0], 3), "queries must be a 2-D array"),
        (lambda i, q: i.search(q * np.nan, 3), "queries contain NaN"),
        (lambda i, q: i.search(q[:2], 3, [None]), "exclude has 1 rows but queries have 2"),
        (lambda i, q: i.vectors([0]), "ids must be item ids in 1..2000, got 0"),
        (lambda i, q: i.add([2005], q[:1]), "new item ids must be contiguous from 2001"),
        (lambda i, q: i.add([3, 3], q[:2]), "ids contain duplicates"),
        (lambda i, q: i.add([3], q[:2]), r"vectors must have shape \(1, 16\)"),
    ],
)
def test_bad_search_arguments(
    table: Table, queries: Table, call: Callable[[ItemIndex, Table], object], message: str
) -> None:
    with pytest.raises(ServingError, match=message):
        call(ExactIndex(table), queries)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "hnsw"}, "unknown index kind 'hnsw'; expected one of exact, exact-int8, ivf"),
        ({"shards": 0}, "shards must be an integer >= 1, got 0"),
        ({"shards": 2001}, r"shards must be <= the number of items \(2000\), got 2001"),
        ({"kind": "exact", "min_recall": 0.9}, "unknown option.*'exact': min_recall"),
        ({"kind": "ivf", "min_recall": 1.5}, r"min_recall must be in \(0, 1\], got 1.5"),
        ({"kind": "ivf", "nprobe": 0}, "nprobe must be an integer >= 1, got 0"),
    ],
)
def test_bad_build_arguments(table: Table, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ServingError, match=message):
        build_index(table, **kwargs)  # type: ignore[arg-type]


def test_bad_tables() -> None:
    with pytest.raises(ServingError, match="at least one item"):
        build_index(np.zeros((1, 4), np.float32))
    with pytest.raises(ServingError, match="table contains NaN or inf"):
        build_index(np.full((3, 4), np.inf, np.float32))
