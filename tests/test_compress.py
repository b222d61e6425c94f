"""Compression: quantization bounds and parity, pruning, distillation, export, and compressed
versions that load, evaluate and serve like any other."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from recloop.compress.distill import (
    DistillConfig,
    build_student,
    chunked_distillation_loss,
    distill,
    inherit_teacher_weights,
    teacher_blocks,
)
from recloop.compress.export import export_encoder
from recloop.compress.pipeline import CompressOptions, compress_version
from recloop.compress.prune import prune_structured
from recloop.compress.quantize import quantize_model, sample_histories
from recloop.config import TrainConfig, config_from_dict
from recloop.data.dataset import SequenceDataset
from recloop.data.prepare import prepare, with_source_order
from recloop.errors import ConfigError, RegistryError
from recloop.evaluate import EvalConfig, evaluate
from recloop.models.base import SequentialEncoder
from recloop.models.codec import (
    dequantize_channels,
    dequantize_rows,
    pack_int4,
    quantize_channels,
    quantize_rows,
    unpack_int4,
)
from recloop.models.compressed import CompressedItemEmbedding, count_dense_parameters
from recloop.models.embeddings import ItemEmbedding
from recloop.models.factory import build_model, config_to_dict
from recloop.registry import WEIGHTS, Registry
from recloop.registry.loading import load_model
from recloop.train.trainer import train
from tests.serving import make_dataset

TEACHER = {"type": "hstu", "dim": 16, "num_blocks": 2, "num_heads": 2, "dropout": 0.0}
SHORT = {"batch_size": 32, "max_steps": 8, "eval_every_steps": 8, "warmup_steps": 0}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is fastest, and far faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("compress")
    data = make_dataset(root / "data")
    config = config_from_dict(
        {
            "model": TEACHER,
            "train": {"batch_size": 32, "max_length": 20, "lr": 3e-3, "warmup_steps": 2,
                      "max_steps": 60, "eval_every_steps": 60, "seed": 1},
        }
    )  # fmt: skip
    result = train(config, data, root / "run", registry_dir=root / "registry", show_progress=False)
    assert result.version is not None
    registry = Registry(root / "registry")
    int8 = compress_version(registry, result.version, CompressOptions("int8", show_progress=False))
    return {"root": root, "data": data, "registry": registry, "v1": result.version, "int8": int8}


def versions(registry: Registry) -> list[str]:
    return [info.id for info in registry.list()]


# --------------------------------------------------------------------------- codecs


@pytest.mark.parametrize("bits", [8, 4])
def test_row_quantization_error_is_at_most_half_a_step(bits: int) -> None:
    torch.manual_seed(0)
    table = torch.randn(50, 13) * torch.logspace(-3, 1, 50).unsqueeze(1)  # rows of every scale
    table[0] = 0.0  # padding
    table[7] = 0.37  # a constant row
    codes, scale, offset = quantize_rows(table, bits)
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert codes.shape == (50, 13 if bits == 8 else 7)  # int4: two codes per byte, odd D padded
    restored = dequantize_rows(codes, scale, offset, bits, 13)
    error = (restored - table).abs()
    assert bool((error <= scale.unsqueeze(1) / 2 + 1e-6).all())
    assert torch.equal(restored[0], torch.zeros(13))  # padding decodes to exact zeros
    assert torch.allclose(restored[7], table[7])  # constant row: exact
    levels = 2**bits - 1
    expected = (table.max(1).values - table.min(1).values) / levels
    assert torch.allclose(scale, expected)


def test_int4_packing_round_trips() -> None:
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 1)[:, :15]  # [3, 15], odd width
    packed = pack_int4(codes)
    assert packed.shape == (3, 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, 15), codes.to(torch.int32))


def test_channel_quantization_bound_and_zeros_stay_zero() -> None:
    torch.manual_seed(0)
    weight = torch.randn(8, 5)
    weight[2] = 0.0
    weight[3, ::2] = 0.0  # pruned entries
    codes, scale = quantize_channels(weight)
    restored = dequantize_channels(codes, scale)
    assert bool(((restored - weight).abs() <= scale.unsqueeze(1) / 2 + 1e-7).all())
    assert bool((restored[weight == 0] == 0).all())
    assert int(codes.abs().max()) == 127


@pytest.mark.parametrize("model_type", ["sasrec", "hstu"])
def test_compressed_models_rebuild_exactly_from_their_config(model_type: str) -> None:
    torch.manual_seed(0)
    model = build_model(
        model_type, {"num_items": 60, "max_length": 8, "dim": 16, "num_heads": 2, "dropout": 0.0}
    ).eval()
    dead = np.zeros(61, dtype=bool)
    dead[[0, 3, 40]] = True
    pruned = prune_structured(model, 0.5, dead=dead).eval()
    ids = sample_histories(None, num_items=60, max_length=8, count=16)
    for compressed in (pruned, quantize_model(model, embedding_bits=4), quantize_model(pruned)):
        saved = json.loads(json.dumps(config_to_dict(compressed)))
        rebuilt = build_model(saved["type"], saved)
        rebuilt.load_state_dict(compressed.state_dict(), strict=True)
        assert torch.equal(rebuilt.eval().encode(ids), compressed.encode(ids))
    # Dead items: zero rows in the scoring table, padding still -inf.
    table = pruned.item_embedding.output_table()
    assert torch.equal(table[[3, 40]], torch.zeros(2, 16))
    assert pruned.score(pruned.encode(ids))[:, 0].isinf().all()


def test_a_quantized_bsarec_rebuilds_and_structured_pruning_refuses_it() -> None:
    torch.manual_seed(0)
    model = build_model(
        "bsarec", {"num_items": 60, "max_length": 8, "dim": 16, "num_heads": 2, "dropout": 0.0}
    ).eval()
    ids = sample_histories(None, num_items=60, max_length=8, count=16)
    quantized = quantize_model(model)
    saved = json.loads(json.dumps(config_to_dict(quantized)))
    rebuilt = build_model(saved["type"], saved)
    rebuilt.load_state_dict(quantized.state_dict(), strict=True)
    assert torch.equal(rebuilt.eval().encode(ids), quantized.encode(ids))
    overlap = model.score(model.encode(ids)).topk(10).indices.unsqueeze(-1) == quantized.score(
        quantized.encode(ids)
    ).topk(10).indices.unsqueeze(-2)
    assert overlap.any(-1).float().mean() > 0.8  # int8 barely moves the ranking
    with pytest.raises(ConfigError, match="prune-structured supports sasrec and hstu"):
        prune_structured(model, 0.5)
    with pytest.raises(ConfigError, match="structured pruning supports sasrec and hstu"):
        build_model("bsarec", {**saved, "compression": {"blocks": [{"heads": 1}]}})


# --------------------------------------------------------------------------- quantization


def test_int8_version_is_small_loads_and_keeps_its_accuracy(trained: dict[str, Any]) -> None:
    registry: Registry = trained["registry"]
    result = trained["int8"]
    manifest = registry.manifest(result.version).to_json()
    assert manifest["parent"] == trained["v1"] and manifest["method"] == "int8"
    assert manifest["model"]["compression"]["embedding_bits"] == 8
    parent_bytes = registry.manifest(trained["v1"]).to_json()["files"][WEIGHTS]["bytes"]
    weights_bytes = manifest["files"][WEIGHTS]["bytes"]
    assert manifest["metrics"]["compression/weights_bytes"] == weights_bytes
    # D = 16 and 120 items: 16 code bytes + 8 of scale/offset per row against 64 float bytes,
    # and the positions, norms and file header weigh more than in a real model.
    assert weights_bytes / parent_bytes < 0.5
    model, _ = load_model(registry, result.version)
    assert isinstance(model.item_embedding, CompressedItemEmbedding)
    assert model.item_embedding.weight.dtype == torch.int8
    metrics = manifest["metrics"]
    # Parity tolerances of int8 on this model: the ranking barely moves.
    assert metrics["parity/top10_overlap"] >= 0.95
    # Scores are cosine / temperature, in [-1/T, 1/T]: int8 moves them by < 1% of 1/T.
    top_score = 1.0 / registry.manifest(trained["v1"]).to_json()["model"]["temperature"]
    assert metrics["parity/max_score_error"] < 0.01 * top_score
    parent = registry.manifest(trained["v1"]).to_json()["metrics"]["test/NDCG@10"]
    assert abs(metrics["test/NDCG@10"] - parent) <= 0.05 * parent
    # The evaluation path gives the recorded metric from the loaded version.
    dataset = SequenceDataset(trained["data"])
    again = evaluate(
        model, dataset.leave_one_out().test, dataset.sequences, EvalConfig(max_length=20)
    )
    assert again["NDCG@10"] == pytest.approx(metrics["test/NDCG@10"])


def test_int4_is_smaller_and_less_exact_than_int8(trained: dict[str, Any]) -> None:
    registry: Registry = trained["registry"]
    options = CompressOptions("int4", evaluate=False, show_progress=False)
    int4 = compress_version(registry, trained["v1"], options).metrics
    int8 = trained["int8"].metrics
    assert int4["compression/weights_bytes"] < int8["compression/weights_bytes"]
    assert int4["parity/max_score_error"] > int8["parity/max_score_error"]
    assert int4["parity/top10_overlap"] >= 0.6


# --------------------------------------------------------------------------- bad input


def test_bad_requests_are_clear_errors_and_write_nothing(trained: dict[str, Any]) -> None:
    registry: Registry = trained["registry"]
    before = versions(registry)
    v1, int8 = trained["v1"], trained["int8"].version
    # Factories: a CompressOptions with a bad field is refused when it is built.
    cases: list[tuple[str, Callable[[], CompressOptions], str]] = [
        ("v000999", lambda: CompressOptions("int8"), "unknown version v000999"),
        (v1, lambda: CompressOptions("fp16"), "--method 'fp16' is not one of"),
        (int8, lambda: CompressOptions("int8"), "quantized already"),
        (int8, lambda: CompressOptions("prune-magnitude", sparsity=0.5), "quantized already"),
        (
            v1,
            lambda: CompressOptions("prune-structured", sparsity=0.0),
            "sparsity must be in (0, 1)",
        ),
        (
            v1,
            lambda: CompressOptions("prune-magnitude", sparsity=1.0),
            "sparsity must be in (0, 1)",
        ),
        (
            v1,
            lambda: CompressOptions("prune-magnitude", sparsity=-0.2),
            "sparsity must be in (0, 1)",
        ),
        (v1, lambda: CompressOptions("prune-magnitude"), "needs --sparsity"),
        (v1, lambda: CompressOptions("int8", sparsity=0.5), "applies to pruning methods"),
        (v1, lambda: CompressOptions("distill"), "needs a student"),
        (v1, lambda: CompressOptions("distill", student={"type": "bert"}), "student model.type"),
        (v1, lambda: CompressOptions("distill", student={"type": "sasrec", "dim": 0}), "dim=0"),
        (
            v1,
            lambda: from_teacher({"type": "sasrec", "dim": 16}),
            "a student of the teacher's type",
        ),
        (v1, lambda: from_teacher({"type": "hstu", "dim": 8}), "no teacher counterpart"),
        (
            v1,
            lambda: CompressOptions("int8", train={"item_attributes": True}),
            "folded into its item",
        ),
    ]
    for ref, options, message in cases:
        with pytest.raises((ConfigError, RegistryError), match=None) as caught:
            compress_version(registry, ref, options())
        assert message in str(caught.value), (message, str(caught.value))
    assert versions(registry) == before
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".tmp-")]
    done = subprocess.run(
        [sys.executable, "-m", "recloop.cli", "compress", "--registry", str(registry.root),
         "--version", v1, "--method", "prune-magnitude", "--sparsity", "1.5"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "sparsity must be in (0, 1)" in done.stderr
    assert versions(registry) == before


def from_teacher(student: dict[str, Any]) -> CompressOptions:
    return CompressOptions(
        "distill", student=student, distill=DistillConfig(init="teacher"), train=SHORT
    )


def test_student_starts_from_the_teachers_table_and_first_block(trained: dict[str, Any]) -> None:
    teacher, _ = load_model(trained["registry"], trained["v1"])  # 2 blocks
    student = build_student(teacher, {**TEACHER, "num_blocks": 1})
    copied = inherit_teacher_weights(teacher, student)
    theirs = teacher.state_dict()
    for key, tensor in student.state_dict().items():
        assert key in copied
        assert torch.equal(tensor, theirs[key]), key  # blocks.0 <- teacher blocks.0
    assert teacher_blocks(4, 2) == [0, 2] and teacher_blocks(4, 1) == [0]
    wider = build_student(teacher, {**TEACHER, "num_blocks": 1, "linear_dim": 16})
    own = {k: v.clone() for k, v in wider.state_dict().items()}
    copied = inherit_teacher_weights(teacher, wider)
    assert "item_embedding.weight" in copied and "blocks.0.uvqk.weight" not in copied
    assert torch.equal(wider.state_dict()["blocks.0.uvqk.weight"], own["blocks.0.uvqk.weight"])
    assert torch.equal(wider.item_embedding.weight, teacher.item_embedding.weight)
    with pytest.raises(ConfigError, match=r"distill\.init must be one of scratch, teacher"):
        DistillConfig(init="pretrained")


# --------------------------------------------------------------------------- pruning


def test_magnitude_pruning_keeps_its_zeros_through_the_fine_tune(trained: dict[str, Any]) -> None:
    registry: Registry = trained["registry"]
    options = CompressOptions(
        "prune-magnitude", sparsity=0.5, train=SHORT, evaluate=False, show_progress=False
    )
    result = compress_version(registry, trained["v1"], options)
    assert result.fit is not None and result.fit.steps == 8
    model, manifest = load_model(registry, result.version)
    nonzero, total = count_dense_parameters(model)
    assert nonzero == total - round(0.5 * total)  # exactly half, after 8 fine-tuning steps
    assert manifest.metrics["compression/dense_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert manifest.parent == trained["v1"] and manifest.method == "prune-magnitude"


def test_structured_pruning_removes_parameters(trained: dict[str, Any]) -> None:
    for model_type, heads in (("sasrec", 2), ("hstu", 4)):
        model = build_model(model_type, {"num_items": 60, "dim": 32, "num_heads": heads})
        pruned = prune_structured(model, 0.8)
        before, after = count_dense_parameters(model)[1], count_dense_parameters(pruned)[1]
        assert after <= 0.25 * before  # 80% of heads / channels / FFN units gone, or nearly
        assert sum(p.numel() for p in pruned.parameters()) < sum(
            p.numel() for p in model.parameters()
        )
    registry: Registry = trained["registry"]
    options = CompressOptions(
        "prune-structured", sparsity=0.5, train=SHORT, evaluate=False, show_progress=False
    )
    result = compress_version(registry, trained["v1"], options)
    model, manifest = load_model(registry, result.version)
    blocks = manifest.model["compression"]["blocks"]
    assert [b["heads"] for b in blocks] == [1, 1]  # 2 heads -> 1 per block
    assert model.blocks[0].uvqk.weight.shape[0] == 32  # 1 head x (2 x 8 + 2 x 8) channels, of 64
    assert manifest.metrics["compression/size_ratio"] < 1.0
    assert manifest.metrics["compression/dense_sparsity"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- distillation


@pytest.mark.parametrize(("alpha", "temperature"), [(0.0, 1.0), (0.3, 1.0), (1.0, 2.0)])
def test_chunked_distillation_loss_matches_the_plain_formula(
    alpha: float, temperature: float
) -> None:
    torch.manual_seed(0)
    query = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    table = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    teacher_query, teacher_table = torch.randn(7, 5, dtype=torch.float64), torch.randn(11, 5)
    teacher_table = teacher_table.double()
    targets = torch.randint(0, 11, (7,))
    config = DistillConfig(alpha=alpha, temperature=temperature, chunk=3)
    fast = chunked_distillation_loss(query, table, targets, teacher_query, teacher_table, config)
    p = torch.softmax(teacher_query @ teacher_table.T / temperature, dim=1)
    log_q = torch.log_softmax(query @ table.T / temperature, dim=1)
    kl = (p * (p.log() - log_q)).sum() * temperature**2
    ce = torch.nn.functional.cross_entropy(query @ table.T, targets, reduction="sum")
    plain = (1 - alpha) * ce + alpha * kl
    assert fast.item() == pytest.approx(plain.item(), rel=1e-12)
    for got, want in zip(
        torch.autograd.grad(fast, (query, table)),
        torch.autograd.grad(plain, (query, table)),
        strict=True,
    ):
        assert torch.allclose(got, want, atol=1e-12)


class OracleTeacher(SequentialEncoder):
    """Knows the data's true next-item distribution: its logits are log p(next | last item)."""

    def __init__(self, log_probs: torch.Tensor) -> None:
        super().__init__()
        num_items = log_probs.shape[0] - 1
        self.item_embedding = ItemEmbedding(num_items, num_items + 1)
        with torch.no_grad():
            self.item_embedding.weight.copy_(torch.eye(num_items + 1))  # scores = the vector
        self.register_buffer("log_probs", log_probs)

    def forward(
        self,
        input_ids: torch.Tensor,
        timestamps: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> Any:
        return self.log_probs[input_ids[:, -1:] if last_only else input_ids]  # [B, L, I + 1]


def test_distillation_beats_the_same_student_alone_on_a_known_answer(tmp_path: Path) -> None:
    # Each item has a successor; the next item is the successor half of the time, otherwise
    # uniform. The known answer for any history: the successor of its last item.
    items, follow = 40, 0.5
    rng = np.random.default_rng(0)
    successor = np.concatenate([[0], rng.permutation(items) + 1])
    users, events = [], []
    for user in range(150):
        item = int(rng.integers(1, items + 1))
        for _ in range(12):
            users.append(user)
            events.append(item)
            chained = rng.random() < follow
            item = int(successor[item]) if chained else int(rng.integers(1, items + 1))
    frame = pl.DataFrame({"user": users, "item": events, "timestamp": range(len(users))})
    prepare(with_source_order([frame.cast(pl.Int64)]), {"kind": "test"}, tmp_path / "data")
    dataset = SequenceDataset(tmp_path / "data")
    probs = torch.full((items + 1, items + 1), (1 - follow) / items)
    probs[torch.arange(items + 1), torch.from_numpy(successor)] += follow
    teacher = OracleTeacher(probs.log())
    train_config = TrainConfig(
        batch_size=32, max_length=10, lr=5e-3, warmup_steps=0, max_steps=40, eval_every_steps=40
    )
    last = np.asarray(dataset.sequences.offsets[1:]) - 1
    histories = torch.from_numpy(
        np.stack([np.asarray(dataset.sequences.items[e - 9 : e + 1]) for e in last]).astype(
            np.int64
        )
    )  # [U, 10]: every user's last 10 items
    answer = torch.from_numpy(successor[histories[:, -1].numpy()])
    accuracy = {}
    for alpha in (0.0, 0.5):
        torch.manual_seed(0)
        student = build_model("sasrec", {"num_items": items, "max_length": 10, "dim": 16,
                                         "num_blocks": 1, "dropout": 0.0})  # fmt: skip
        result = distill(
            teacher, student, dataset, train_config, DistillConfig(alpha=alpha), show_progress=False
        )
        assert result.steps == 40
        with torch.no_grad():
            top = student.score(student.encode(histories)).argmax(dim=1)
        accuracy[alpha] = float((top == answer).float().mean())
    # Alone: ~0.55 of the answers after 40 steps; with the teacher: ~0.7.
    assert accuracy[0.5] >= accuracy[0.0] + 0.08, accuracy


def test_distill_publishes_the_student(trained: dict[str, Any]) -> None:
    registry: Registry = trained["registry"]
    student = {"type": "sasrec", "dim": 8, "num_blocks": 1, "dropout": 0.0}
    options = CompressOptions(
        "distill", student=student, train=SHORT, evaluate=False, show_progress=False
    )
    result = compress_version(registry, trained["v1"], options)
    model, manifest = load_model(registry, result.version)
    assert type(model).__name__ == "SASRec" and model.config.dim == 8
    assert manifest.parent == trained["v1"] and manifest.method == "distill"
    assert manifest.model["type"] == "sasrec" and manifest.model["dim"] == 8
    assert manifest.model["max_length"] == 20  # the teacher's window
    assert manifest.vocabulary == registry.manifest(trained["v1"]).vocabulary
    assert manifest.metrics["compression/size_ratio"] < 0.6
    assert manifest.training["distill"]["alpha"] == 0.5


# --------------------------------------------------------------------------- serving, export


@pytest.mark.parametrize("engine", ["onnx", "torch"])
def test_int8_version_serves_unchanged(trained: dict[str, Any], engine: str) -> None:
    from recloop.serve.bundle import LoadOptions, load_bundle

    registry: Registry = trained["registry"]
    version = trained["int8"].version
    # ONNX (the default engine) runs the int8 table codes inside the graph, fed at run time.
    bundle = load_bundle(registry, version, LoadOptions(engine=engine, max_batch=8))
    try:
        model, _ = load_model(registry, version)
        histories = sample_histories(
            SequenceDataset(trained["data"]), num_items=120, max_length=20, count=8
        )
        sequences = [row[row > 0].numpy() for row in histories]
        queries = bundle.engine.encode(sequences)
        ids, _ = bundle.index.search(queries, 5)
        with torch.no_grad():
            expected = model.score(model.encode(histories)).topk(5, dim=1).indices.numpy()
        assert (ids == expected).mean() >= 0.95  # ties aside, the same top-5
    finally:
        bundle.close()


def test_export_onnx_parity_and_int8_dense(trained: dict[str, Any], tmp_path: Path) -> None:
    registry: Registry = trained["registry"]
    options = CompressOptions("int8", dense_bits=32, evaluate=False, show_progress=False)
    version = compress_version(registry, trained["v1"], options).version
    model, _ = load_model(registry, version)
    histories = sample_histories(
        SequenceDataset(trained["data"]), num_items=120, max_length=20, count=128
    ).numpy()
    report = export_encoder(model, tmp_path / "out", histories)
    assert report.onnx_parity.max_query_error < 1e-4  # the int8 table runs inside ONNX too
    assert report.onnx_parity.top10_overlap == 1.0
    assert report.onnx_int8_parity is not None and report.onnx_int8_bytes is not None
    assert report.onnx_int8_parity.top10_overlap >= 0.9
    assert report.onnx_int8_bytes < report.onnx_bytes
    # The graph plus tables.safetensors are all a runtime needs: feed the stored rows as the
    # graph's item_table input, score its queries against scoring_table.
    import onnxruntime as ort
    from safetensors.numpy import load_file

    tables = load_file(str(tmp_path / "out" / "tables.safetensors"))
    assert tables["item_table"].dtype == np.int8  # the int8 codes, dequantized in the graph
    session = ort.InferenceSession(report.onnx, providers=["CPUExecutionProvider"])
    ids = histories[:16]
    query = session.run(None, {"ids": ids, "item_table": tables["item_table"]})[0]
    with torch.no_grad():
        expected = model.score(model.encode(torch.from_numpy(ids))).numpy()
    scores = query @ tables["scoring_table"].T  # [16, I + 1]; column 0 is padding
    np.testing.assert_allclose(scores[:, 1:], expected[:, 1:], atol=1e-4, rtol=1e-4)
    saved = json.loads((tmp_path / "out" / "export.json").read_text())
    assert saved["onnx_parity"]["sequences"] == 128
    assert (report.torchscript is None) == (report.torchscript_error is not None)
    with pytest.raises(ConfigError, match="not empty"):
        export_encoder(model, tmp_path / "out", histories)


def test_online_learner_refuses_a_compressed_version(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    from recloop.events import SqliteEventLog
    from recloop.online.config import OnlineConfig
    from recloop.online.learner import OnlineLearner

    registry: Registry = trained["registry"]
    log = SqliteEventLog(tmp_path / "events.db")
    with pytest.raises(ConfigError, match=r"compressed \(method 'int8'\).*start it from"):
        OnlineLearner(
            registry, log, OnlineConfig(), tmp_path / "run", start=trained["int8"].version
        )
    assert not (tmp_path / "run" / "state").exists()
