"""Inference engines: parity with the torch model, buckets, preallocated buffers, ONNX cache.

Tiny models (50 items, dim 16, one block, windows of 12) keep this fast; each model is exported
to ONNX once per module, into a shared cache directory that the cache tests reuse.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import recloop.serve.engines.export as engine_module
from recloop.errors import EngineParityError, ServingError
from recloop.models.base import SequentialEncoder
from recloop.models.factory import build_model
from recloop.serve.engines.base import InferenceEngine
from recloop.serve.engines.export import item_table, onnx_cache_path
from recloop.serve.engines.factory import build_engine, warmup
from recloop.serve.engines.onnx import OnnxEngine
from recloop.serve.engines.parity import check_parity
from recloop.serve.engines.torch import TorchEngine

NUM_ITEMS = 50
MAX_LENGTH = 12
MAX_BATCH = 8
TINY: dict[str, Any] = {
    "num_items": NUM_ITEMS,
    "dim": 16,
    "num_blocks": 1,
    "max_length": MAX_LENGTH,
}
# HSTU also covers prepare_query (L2 norm, temperature 0.05); BSARec a non-causal encoder.
MODEL_TYPES = ("sasrec", "hstu", "bsarec")


def tiny_model(model_type: str, seed: int = 0) -> SequentialEncoder:
    torch.manual_seed(seed)
    return build_model(model_type, dict(TINY)).eval()


def reference(model: SequentialEncoder, sequences: list[np.ndarray]) -> np.ndarray:
    """prepare_query(encode(ids)) with every window left-padded to max_length, in torch."""
    ids = np.zeros((len(sequences), MAX_LENGTH), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        window = sequence[-MAX_LENGTH:]
        ids[row, MAX_LENGTH - window.size :] = window
    with torch.inference_mode():
        query = model.item_embedding.prepare_query(model.encode(torch.from_numpy(ids)))
    result: np.ndarray = query.numpy()
    return result


def sequences(lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, NUM_ITEMS + 1, size=length, dtype=np.int64) for length in lengths]


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """Torch engines set the process-wide thread count; give other test modules theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module", params=MODEL_TYPES)
def model(request: pytest.FixtureRequest) -> SequentialEncoder:
    return tiny_model(str(request.param))


@pytest.fixture(scope="module")
def onnx_engine(model: SequentialEncoder, cache_dir: Path) -> InferenceEngine:
    """The one real export per model type of this module (checked for parity on build)."""
    return build_engine(model, "onnx", max_batch=MAX_BATCH, cache_dir=cache_dir, label="v1")


@pytest.fixture(scope="module")
def torch_engine(model: SequentialEncoder) -> InferenceEngine:
    return build_engine(model, "torch", max_batch=MAX_BATCH, label="v1")


@pytest.fixture(params=["onnx", "torch"])
def engine(
    request: pytest.FixtureRequest, onnx_engine: InferenceEngine, torch_engine: InferenceEngine
) -> InferenceEngine:
    return onnx_engine if request.param == "onnx" else torch_engine


# --------------------------------------------------------------------------------------------
# Results


def test_engines_match_the_reference_model(
    engine: InferenceEngine, model: SequentialEncoder
) -> None:
    # Length 1, short, exactly max_length and longer (truncated to the last 12 items).
    mixed = sequences([1, 3, MAX_LENGTH, MAX_LENGTH + 9, 7])
    result = engine.encode(mixed)
    assert result.shape == (5, 16) and result.dtype == np.float32
    np.testing.assert_allclose(result, reference(model, mixed), atol=1e-5, rtol=1e-4)

    # More than max_batch: encoded in chunks into a new array (not a bucket view).
    many = sequences([1 + (i * 5) % (MAX_LENGTH + 4) for i in range(2 * MAX_BATCH + 3)], seed=1)
    result = engine.encode(many)
    assert result.shape == (2 * MAX_BATCH + 3, 16)
    assert not any(np.shares_memory(result, bucket.out) for bucket in engine.buckets.values())
    np.testing.assert_allclose(result, reference(model, many), atol=1e-5, rtol=1e-4)

    assert engine.encode([]).shape == (0, 16)


def test_padding_and_bucket_do_not_change_the_vector(engine: InferenceEngine) -> None:
    target = sequences([4], seed=2)[0]
    others = sequences([MAX_LENGTH + 3, 2, 9, 1], seed=3)
    alone = engine.encode([target])[0].copy()  # bucket (1, 8): 4 ids of left padding
    pairs = [
        ((2, MAX_LENGTH), [target, others[0]], 0),
        ((8, MAX_LENGTH), [*others, target], 4),
        ((4, 8), [others[1], target, others[3]], 1),
    ]
    for bucket, batch, row in pairs:
        used = len(engine.buckets)
        np.testing.assert_allclose(engine.encode(batch)[row], alone, atol=1e-5)
        assert bucket in engine.buckets, bucket
        assert len(engine.buckets) <= used + 1
    # The same items after a longer history differ: the window really holds the context.
    longer = np.concatenate([others[0], target])
    assert not np.allclose(engine.encode([longer])[0], alone, atol=1e-3)


def test_truncation_keeps_the_most_recent_items(engine: InferenceEngine) -> None:
    long = sequences([MAX_LENGTH + 20], seed=4)[0]
    truncated = engine.encode([long]).copy()
    np.testing.assert_allclose(engine.encode([long[-MAX_LENGTH:]]), truncated, atol=1e-6)


def test_onnx_engine_matches_torch_engine(
    onnx_engine: InferenceEngine, torch_engine: InferenceEngine
) -> None:
    batch = sequences([1, 2, 5, 8, 11, MAX_LENGTH, 30], seed=5)
    np.testing.assert_allclose(
        onnx_engine.encode(batch), torch_engine.encode(batch), atol=1e-5, rtol=1e-4
    )


# --------------------------------------------------------------------------------------------
# Buckets and buffers


def test_buckets_are_preallocated_and_reused(engine: InferenceEngine, model: Any) -> None:
    assert engine.batch_sizes == (1, 2, 4, 8)
    assert engine.lengths == (8, MAX_LENGTH)
    warmup(engine)
    assert set(engine.buckets) == {(b, n) for b in (1, 2, 4, 8) for n in (8, MAX_LENGTH)}
    bucket = engine.buckets[(4, MAX_LENGTH)]
    ids, out = bucket.ids, bucket.out
    assert ids.dtype == np.int64 and ids.shape == (4, MAX_LENGTH)
    assert out.dtype == np.float32 and out.shape == (4, 16)

    # Long histories fill the rows; then shorter ones in the same bucket must not see the
    # stale ids left of them (the used rows are cleared before writing).
    first = engine.encode(sequences([MAX_LENGTH, MAX_LENGTH + 4, MAX_LENGTH], seed=6))
    assert np.shares_memory(first, out)
    batch = sequences([9, 11, 10], seed=7)
    second = engine.encode(batch)
    assert np.shares_memory(second, out) and second.shape == (3, 16)
    np.testing.assert_allclose(second, reference(model, batch), atol=1e-5, rtol=1e-4)

    # A batch that spans length buckets runs once per bucket, into a preallocated result.
    mixed = sequences([2, MAX_LENGTH + 3, 1, 10], seed=8)
    third = engine.encode(mixed)
    assert not np.shares_memory(third, out) and third.shape == (4, 16)
    np.testing.assert_allclose(third, reference(model, mixed), atol=1e-5, rtol=1e-4)
    assert np.shares_memory(third, engine.encode(mixed))  # the same preallocated result

    # Same buffers, no new buckets.
    assert engine.buckets[(4, MAX_LENGTH)] is bucket
    assert bucket.ids is ids and bucket.out is out
    assert len(engine.buckets) == 8
    if isinstance(engine, OnnxEngine):
        # IOBinding over our numpy buffers: ORT writes the results into `out` itself.
        assert all(b.direct_output for b in engine.buckets.values())


def test_bucket_sizes_cover_odd_limits(model: SequentialEncoder) -> None:
    engine = TorchEngine(model, max_batch=6)
    assert engine.batch_sizes == (1, 2, 4, 6)
    assert engine.lengths == (8, MAX_LENGTH)
    assert engine.encode(sequences([3] * 5)).shape == (5, 16)
    assert set(engine.buckets) == {(6, 8)}


# --------------------------------------------------------------------------------------------
# Parity check


def test_parity_report_of_a_correct_engine(onnx_engine: InferenceEngine, model: Any) -> None:
    report = check_parity(onnx_engine, model, num_samples=20, seed=1)
    assert report.passed
    assert report.samples == 20 + 10  # random ones + two batches of the 5 edge-case lengths
    assert report.max_abs_error < 1e-5


def test_parity_check_refuses_a_wrong_model(
    onnx_engine: InferenceEngine, model: SequentialEncoder, cache_dir: Path, tmp_path: Path
) -> None:
    other = tiny_model(type(model).__name__.lower(), seed=1)  # same architecture, new weights
    report = check_parity(onnx_engine, other)
    assert not report.passed and report.max_abs_error > 1e-2

    # A stale cache file (another version's export under this version's name) is refused.
    shutil.copy(onnx_cache_path(model, cache_dir), onnx_cache_path(other, tmp_path))
    with pytest.raises(EngineParityError, match=r"onnx engine for v2 .*max abs error \d"):
        build_engine(other, "onnx", max_batch=MAX_BATCH, cache_dir=tmp_path, label="v2")


# --------------------------------------------------------------------------------------------
# ONNX export cache


def test_onnx_cache_exports_once_per_model(
    model: SequentialEncoder,
    onnx_engine: InferenceEngine,
    cache_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exported = onnx_cache_path(model, cache_dir)  # written by the onnx_engine fixture
    assert exported.is_file()
    calls: list[Path] = []

    def fake_export(_: SequentialEncoder, path: Path) -> Path:
        """Stands in for the 5-15 s export: the real file of this model, and a count."""
        calls.append(path)
        shutil.copy(exported, path)
        return path

    monkeypatch.setattr(engine_module, "export_onnx", fake_export)
    fresh = tmp_path / "cache"
    build_engine(model, "onnx", max_batch=2, cache_dir=fresh)
    build_engine(model, "onnx", max_batch=2, cache_dir=fresh)
    assert len(calls) == 1
    # Atomic write: the export went to a temporary name, then was renamed into place.
    assert calls[0].parent == fresh and calls[0].name != exported.name
    assert [path.name for path in fresh.iterdir()] == [exported.name]

    # The real cache directory holds this module's export: reused, no export.
    build_engine(model, "onnx", max_batch=2, cache_dir=cache_dir)
    assert len(calls) == 1

    # Other weights, or the same weights with another config, get another file.
    assert onnx_cache_path(tiny_model(type(model).__name__.lower(), seed=1), fresh) != exported
    other_config = build_model(type(model).__name__.lower(), {**TINY, "temperature": 0.5})
    other_config.load_state_dict(model.state_dict())
    assert onnx_cache_path(other_config, cache_dir) != exported


# --------------------------------------------------------------------------------------------
# Input validation and construction errors


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ([[3, 4], []], "sequence 1 is empty"),
        ([[3, 0, 4]], "sequence 0, position 1: item id 0 is outside 1..50"),
        ([[1], [2, NUM_ITEMS + 1]], "sequence 1, position 1: item id 51 is outside 1..50"),
        # Positions count in the request's sequence, before truncation to the window.
        ([[1] * 20 + [-3]], "sequence 0, position 20: item id -3 is outside 1..50"),
        ([[[1, 2]]], "sequence 0 must be a 1-D integer array"),
        ([[1.0, 2.0]], "sequence 0 must be a 1-D integer array"),
    ],
)
def test_bad_sequences_are_refused(
    torch_engine: InferenceEngine, batch: list[list[Any]], message: str
) -> None:
    with pytest.raises(ServingError, match=message.replace(".", r"\.")):
        torch_engine.encode([np.asarray(sequence) for sequence in batch])


def test_build_engine_refuses_bad_options(model: SequentialEncoder) -> None:
    with pytest.raises(ServingError, match="unknown engine kind 'tensorrt' for v3"):
        build_engine(model, "tensorrt", label="v3")
    with pytest.raises(ServingError, match="onnx engine for v3: runs on CPU only"):
        build_engine(model, "onnx", device="cuda", label="v3")
    with pytest.raises(ServingError, match="threads=0 must be at least 1"):
        build_engine(model, "torch", threads=0)
    with pytest.raises(ServingError, match="max_batch=0"):
        build_engine(model, "torch", max_batch=0)
    if not torch.cuda.is_available():
        with pytest.raises(ServingError, match="CUDA is unavailable"):
            build_engine(model, "torch", device="cuda")


# --------------------------------------------------------------------------------------------
# Item table, torch variants


def test_item_table(model: SequentialEncoder) -> None:
    table = item_table(model)
    assert table.shape == (NUM_ITEMS + 1, 16) and table.dtype == np.float32
    assert table.flags.c_contiguous and table.flags.writeable
    assert not table[0].any()
    expected = model.item_embedding.output_table().detach().numpy()
    np.testing.assert_allclose(table[1:], expected[1:], atol=1e-7)
    assert not np.shares_memory(table, model.item_embedding.weight.detach().numpy())
    # Scores from the engine's queries and the table are the model's logits.
    ids = torch.tensor([[0, 0, 5, 9]])
    with torch.inference_mode():
        logits = model.score(model.encode(ids))[0, 1:].numpy()
    query = TorchEngine(model, max_batch=1).encode([np.array([5, 9])])[0]
    np.testing.assert_allclose(table[1:] @ query, logits, atol=1e-4, rtol=1e-4)


def test_torch_compiled_engine_was_removed_with_a_clear_error() -> None:
    # torch.compile measured slower than eager on CPU (bench/results/train_speed.json): the
    # engine kind went; asking for it names the kinds there are.
    from recloop.errors import ConfigError
    from recloop.serve.bundle import LoadOptions

    model = tiny_model("sasrec")
    with pytest.raises(ServingError, match=r"unknown engine kind 'torch-compiled'.*onnx, torch"):
        build_engine(model, "torch-compiled", max_batch=2, check=False)
    with pytest.raises(ConfigError, match=r"--engine torch-compiled was removed.*onnx.*torch"):
        LoadOptions(engine="torch-compiled")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_engine_on_cuda() -> None:
    model = tiny_model("hstu")
    batch = sequences([1, 4, MAX_LENGTH + 2])
    expected = reference(model, batch)
    engine = build_engine(model, "torch", max_batch=4, device="cuda")
    np.testing.assert_allclose(engine.encode(batch), expected, atol=1e-4, rtol=1e-3)
