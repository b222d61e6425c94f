"""Model-parallel training (train.sharding): the item table as a TorchRec table sharded over
processes. It learns, publishes one file per shard that loads into one process, resumes
exactly, 2 gloo processes match 1, and what it cannot run is one clear error up front."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("torchrec", reason="needs the recloop[sharded] extra (make setup has it)")

from recloop.config import ConfigError, config_from_dict
from recloop.data.dataset import SequenceDataset
from recloop.evaluate import EvalConfig, evaluate
from recloop.registry import Registry
from recloop.registry.loading import load_model
from recloop.train.sharding import spec
from recloop.train.trainer import train
from tests.test_train import tiny_train

MODEL = {"type": "sasrec", "dim": 16, "num_blocks": 1, "num_heads": 1, "dropout": 0.0}


def sharded_train(**overrides: object) -> dict[str, object]:
    """test_train's tiny run with its item table sharded row-wise, sampled softmax."""
    sharded: dict[str, object] = {
        "sharding": "row_wise",
        "loss": "sampled_softmax",
        "num_negatives": 32,
        "sparse_lr": 0.05,
    }
    return tiny_train(**{**sharded, **overrides})


def test_learns_publishes_shards_and_loads_into_one_process(
    synthetic_data: Path, tmp_path: Path
) -> None:
    config = config_from_dict(
        {"model": MODEL, "train": sharded_train(max_steps=60, eval_every_steps=20)}
    )
    registry = tmp_path / "reg"
    result = train(
        config, synthetic_data, tmp_path / "run", registry_dir=registry, show_progress=False
    )
    # The synthetic log's successor structure is learnt through the sharded table too
    # (popularity is ~0.1 HR@10; the unsharded run's test asserts > 0.3 the same way).
    assert result.best_metrics["HR@10"] > 0.3
    manifest = Registry(registry).manifest("latest").to_json()
    shard_files = [name for name in manifest["files"] if ".shard-" in name]
    assert len(shard_files) == 1  # one process: one shard
    assert manifest["training"]["sharding"]["type"] == "row_wise"
    # A single process gathers the shards: the loaded model scores the test split exactly as
    # the sharded run's own (gathered) evaluation did.
    model, _ = load_model(Registry(registry), "latest")
    dataset = SequenceDataset(synthetic_data)
    split = dataset.leave_one_out()
    metrics = evaluate(model, split.test, split.source, EvalConfig(max_length=20))
    assert metrics["HR@10"] == pytest.approx(result.test_metrics["HR@10"], abs=1e-6)
    assert metrics["NDCG@10"] == pytest.approx(result.test_metrics["NDCG@10"], abs=1e-6)


def _table_file(run_dir: Path) -> dict[str, torch.Tensor]:
    name = (run_dir / "LATEST").read_text().strip()
    step = name.removeprefix("step-")
    path = run_dir / "checkpoints" / f"table-step-{step}" / "rank00000.safetensors"
    return load_file(str(path))


def test_resume_of_a_sharded_run_is_exact(synthetic_data: Path, tmp_path: Path) -> None:
    config = config_from_dict(
        {"model": {**MODEL, "dropout": 0.3}, "train": sharded_train(negatives="mixed")}
    )
    straight = train(config, synthetic_data, tmp_path / "a", show_progress=False)
    first = train(config, synthetic_data, tmp_path / "b", stop_at_step=7, show_progress=False)
    assert first.stopped_by == "interrupted"
    resumed = train(config, synthetic_data, tmp_path / "b", resume=True, show_progress=False)
    assert resumed.steps == straight.steps == 12
    a, b = _table_file(tmp_path / "a"), _table_file(tmp_path / "b")
    assert a.keys() == b.keys() and any(k.startswith("optimizer/") for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    dense_a = load_file(
        str(tmp_path / "a" / "checkpoints" / "step-000000012" / "model.safetensors")
    )
    dense_b = load_file(
        str(tmp_path / "b" / "checkpoints" / "step-000000012" / "model.safetensors")
    )
    for name in dense_a:
        assert torch.equal(dense_a[name], dense_b[name]), name
    assert resumed.test_metrics == straight.test_metrics


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_gloo_processes_match_one_and_refuse_another_world_size(
    synthetic_data: Path, tmp_path: Path
) -> None:
    """The full softmax (no random negatives) and no dropout make the runs comparable: 2
    processes with the same global batch reach the 1-process table and encoder."""
    overrides = ["train.loss='full_softmax'", "train.max_steps=8"]
    config_path = tmp_path / "exp.toml"
    config_path.write_text(
        '[model]\ntype = "sasrec"\ndim = 16\nnum_blocks = 1\nnum_heads = 1\ndropout = 0.0\n'
        "[train]\nbatch_size = 32\nmax_length = 20\neval_every_steps = 4\nwarmup_steps = 2\n"
        'lr = 3e-3\nseed = 3\nsharding = "row_wise"\nsparse_lr = 0.05\n'
    )
    common = ["train", "--data", str(synthetic_data), "--config", str(config_path)]
    common += overrides
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for processes in (1, 2):
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                    "--master_port", str(_free_port()), "-m", "recloop.cli"]  # fmt: skip
        done = subprocess.run(
            [*launcher, *common, "--registry", str(tmp_path / f"r{processes}"),
             "--run-dir", str(tmp_path / f"run{processes}"), "--threads", "1"],
            capture_output=True, text=True, env=env, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        runs[processes] = Registry(tmp_path / f"r{processes}")
    one, two = runs[1].load_tensors("latest"), runs[2].load_tensors("latest")
    assert one.keys() == two.keys() and spec.TABLE_NAME
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-5, msg=name)
    manifest = runs[2].manifest("latest").to_json()
    assert manifest["training"]["world_size"] == 2
    assert len([name for name in manifest["files"] if ".shard-" in name]) == 2
    # Resharding on load: the 2-shard version into 4 processes and into 1, the 1-shard one
    # into 2 (column-wise, so the blocks read cut across the stored shards).
    for source, processes, layout in (
        (2, 4, "row_wise"),
        (2, 1, "row_wise"),
        (1, 2, "column_wise"),
    ):
        gathered, shards = _reshard(tmp_path, runs[source], processes, layout, env)
        assert shards == (processes if layout != "table_wise" else 1)
        assert torch.equal(gathered, runs[source].load_tensors("latest")["item_embedding.weight"])
    # The 2-process checkpoint cannot be resumed by one process: one clear error, before any step.
    config = config_from_dict(
        {"model": MODEL, "train": sharded_train(loss="full_softmax", max_steps=16, seed=3)}
    )
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\).*resume with the same"):
        train(config, synthetic_data, tmp_path / "run2", resume=True, show_progress=False)


def _reshard(
    tmp_path: Path, registry: Registry, processes: int, layout: str, env: dict[str, str]
) -> tuple[torch.Tensor, int]:
    out = tmp_path / f"gathered-{processes}-{layout}.safetensors"
    worker = Path(__file__).with_name("sharded_worker.py")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
         "--master_port", str(_free_port()), str(worker), str(registry.root), "latest", layout,
         str(out)],
        capture_output=True, text=True, env=env, timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    saved = load_file(str(out))
    return saved["table"], int(saved["shards"])


def test_what_a_sharded_table_cannot_run_is_refused_before_training(
    synthetic_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = tmp_path / "reg"
    adam = config_from_dict({"model": MODEL, "train": sharded_train(sparse_optimizer="adam")})
    with pytest.raises(ConfigError, match=r"'adam' does not run on cpu"):
        train(adam, synthetic_data, tmp_path / "a", registry_dir=registry, show_progress=False)
    monkeypatch.setattr(spec, "FULL_SOFTMAX_MAX_ITEMS", 100)  # the synthetic set has 120
    full = config_from_dict({"model": MODEL, "train": sharded_train(loss="full_softmax")})
    with pytest.raises(ConfigError, match=r"full_softmax.*120 items.*refused above 100"):
        train(full, synthetic_data, tmp_path / "b", registry_dir=registry, show_progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not registry.exists() or Registry(registry).list() == []
    with pytest.raises(ConfigError, match=r"does not support train.loss = 'bce'"):
        config_from_dict({"model": MODEL, "train": sharded_train(loss="bce")})
    with pytest.raises(ConfigError, match=r"train.sharding must be one of"):
        config_from_dict({"model": MODEL, "train": sharded_train(sharding="grid")})


def test_the_memory_estimate_counts_what_each_layout_keeps() -> None:
    # Replicated: weight + dense gradient + 2 AdamW moments; sharded: weight + 1 Adagrad value.
    assert spec.bytes_per_row(64, sharded=False) == 4 * 64 * 4
    assert spec.bytes_per_row(64, sharded=True) == 64 * 4 + 4
    assert spec.bytes_per_row(64, sharded=True, sparse_optimizer="adam") == 3 * 64 * 4


def test_a_table_too_big_for_this_machine_is_refused_before_allocating() -> None:
    import torch.distributed as dist

    from recloop.config import TrainConfig
    from recloop.train.distributed import DistContext
    from recloop.train.sharding.table import ShardedItemTable

    context = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    too_big = 10**10  # 2.5 TB of fp32 rows at dim 64
    cfg = TrainConfig(sharding="row_wise", loss="sampled_softmax")
    with pytest.raises(ConfigError, match=r"no plan fits a \[10,000,000,000, 64\] table"):
        ShardedItemTable(too_big, 64, cfg, context, init_std=0.02)
    assert not dist.is_initialized()


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (NCCL, fbgemm's GPU kernels)"
)
def test_the_gpu_path_trains_a_sharded_table_with_adam_and_bf16(
    synthetic_data: Path, tmp_path: Path
) -> None:
    config = config_from_dict(
        {"model": MODEL, "train": sharded_train(sparse_optimizer="adam", bf16=True, max_steps=8)}
    )
    result = train(
        config, synthetic_data, tmp_path / "run", registry_dir=tmp_path / "reg",
        device="cuda", show_progress=False,
    )  # fmt: skip
    assert result.steps == 8 and result.version is not None
    assert Registry(tmp_path / "reg").manifest("latest").to_json()["training"]["sharding"]
