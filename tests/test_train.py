"""Training: learning on a known-answer synthetic set, exact resume, DDP = one process,
publishing to the registry, and the CLI as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recloop.config import ConfigError, config_from_dict, load_config
from recloop.data.dataset import SequenceDataset
from recloop.data.prepare import prepare, with_source_order
from recloop.data.synthetic import SyntheticConfig, generate_events
from recloop.evaluate import EvalConfig, evaluate, sample_negatives
from recloop.registry import Registry
from recloop.train.loop import VALID_NEGATIVES_SEED, lr_at
from recloop.train.trainer import train
from tests.warm_interpreter import WarmInterpreter, warm_interpreter

TINY_MODEL = {"type": "sasrec", "dim": 16, "num_blocks": 1, "num_heads": 1, "dropout": 0.0}


def tiny_train(**overrides: object) -> dict[str, object]:
    values: dict[str, object] = {
        "batch_size": 32,
        "max_length": 20,
        "lr": 3e-3,
        "warmup_steps": 2,
        "max_steps": 12,
        "eval_every_steps": 4,
        "seed": 7,
    }
    values.update(overrides)
    return values


def checkpoint_weights(run_dir: Path, kind: str = "model") -> dict[str, torch.Tensor]:
    """The latest checkpoint's "model" weights, or its weight "average" ({} when none)."""
    name = (run_dir / "LATEST").read_text().strip()
    path = run_dir / "checkpoints" / name / f"{kind}.safetensors"
    return load_file(str(path)) if path.is_file() or kind == "model" else {}


def test_learns_sequential_structure_and_publishes(synthetic_data: Path, tmp_path: Path) -> None:
    config = config_from_dict(
        {"model": TINY_MODEL, "train": tiny_train(max_steps=60, eval_every_steps=20)}
    )
    result = train(
        config, synthetic_data, tmp_path / "run", registry_dir=tmp_path / "reg", show_progress=False
    )
    # The synthetic log's successor structure is learnable: far above popularity (~0.1 HR@10).
    assert result.best_metrics["HR@10"] > 0.3
    assert result.version == "v000001"
    manifest = Registry(tmp_path / "reg").manifest("v000001").to_json()
    assert manifest["model"]["type"] == "sasrec"
    assert manifest["metrics"]["test/HR@10"] == result.test_metrics["HR@10"]
    assert manifest["training"]["steps"] == 60
    assert {"items.parquet", "metrics.csv", "curves.png"} <= set(manifest["files"])
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,epoch,elapsed_s,train_loss,lr,tokens_per_s,valid/")
    assert len(lines) == 1 + 3  # header + evaluations at steps 20, 40, 60


def test_sampled100_validation_selects_on_its_own_negatives(
    synthetic_data: Path, tmp_path: Path
) -> None:
    config = config_from_dict(
        {"model": TINY_MODEL, "train": tiny_train(eval_protocol="sampled100")}
    )
    result = train(
        config, synthetic_data, tmp_path / "run", registry_dir=tmp_path / "reg", show_progress=False
    )
    # Validation metrics are named for their protocol; the published test is full ranking.
    assert "sampled100/NDCG@10" in result.best_metrics
    assert "NDCG@10" not in result.best_metrics
    assert "HR@10" in result.test_metrics and "sampled100/HR@10" not in result.test_metrics
    manifest = Registry(tmp_path / "reg").manifest("v000001").to_json()
    assert "valid/sampled100/NDCG@10" in manifest["metrics"]
    assert "test/HR@10" in manifest["metrics"]
    assert "valid/sampled100/NDCG@10" in (tmp_path / "run" / "metrics.csv").read_text()

    # The selected checkpoint's numbers are the sampled-100 protocol, seeded apart from the
    # test's negatives (seed 0 in `recloop eval`) so that selection never sees those.
    split = SequenceDataset(synthetic_data).leave_one_out()
    assert result.model is not None
    eval_config = EvalConfig(max_length=20, protocol="sampled100", seed=VALID_NEGATIVES_SEED)
    again = evaluate(result.model, split.valid, split.source, eval_config)
    assert again["NDCG@10"] == pytest.approx(result.best_metrics["sampled100/NDCG@10"])
    num_items = SequenceDataset(synthetic_data).num_items
    valid_negatives = sample_negatives(split.valid.users, split.source, num_items, seed=1)
    test_negatives = sample_negatives(split.test.users, split.source, num_items, seed=0)
    assert (valid_negatives != test_negatives).mean() > 0.9


def test_history_masking_and_the_bpr_term_train_end_to_end(
    synthetic_data: Path, tmp_path: Path
) -> None:
    from recloop.online.config import OnlineConfig, loss_config

    overrides = tiny_train(max_steps=60, eval_every_steps=20, mask_history=True, bpr_weight=0.5)
    config = config_from_dict({"model": TINY_MODEL, "train": overrides})
    result = train(
        config, synthetic_data, tmp_path / "run", registry_dir=tmp_path / "reg", show_progress=False
    )
    assert result.best_metrics["HR@10"] > 0.3  # learns as well as the plain full softmax
    manifest = Registry(tmp_path / "reg").manifest("v000001")
    trained = manifest.training["config"]["train"]
    assert trained["mask_history"] is True and trained["bpr_weight"] == 0.5
    # The online learner fine-tunes with the loss the version was trained with.
    assert loss_config(OnlineConfig(loss="auto"), manifest).mask_history is True
    assert loss_config(OnlineConfig(loss="bce"), manifest).mask_history is False


BSAREC = {"type": "bsarec", "dim": 16, "num_blocks": 1, "dropout": 0.0, "attention_dropout": 0.0}


def test_bsarec_trains_on_prefixes_publishes_and_refuses_whole_windows(
    synthetic_data: Path, tmp_path: Path
) -> None:
    from recloop.registry.loading import load_model

    whole = config_from_dict({"model": BSAREC, "train": tiny_train(max_steps=2)})
    with pytest.raises(ConfigError, match=r"not causal.*train\.samples = 'prefixes'"):
        train(whole, synthetic_data, tmp_path / "refused", show_progress=False)
    assert not (tmp_path / "refused" / "LATEST").exists()  # refused before any step

    overrides = tiny_train(max_steps=120, eval_every_steps=40, samples="prefixes", lr=5e-3)
    config = config_from_dict({"model": BSAREC, "train": overrides})
    result = train(
        config, synthetic_data, tmp_path / "run", registry_dir=tmp_path / "reg", show_progress=False
    )
    assert result.best_metrics["HR@10"] > 0.3  # learns the successor structure (~0.1 popular)
    model, manifest = load_model(Registry(tmp_path / "reg"), "v000001")
    assert manifest.model["type"] == "bsarec" and not model.causal
    assert manifest.training["config"]["train"]["samples"] == "prefixes"
    split = SequenceDataset(synthetic_data).leave_one_out()
    again = evaluate(model, split.test, split.source, EvalConfig(max_length=20))
    assert again["HR@10"] == pytest.approx(result.test_metrics["HR@10"])


@pytest.mark.parametrize(
    ("model", "loss"),
    [
        (TINY_MODEL, {"loss": "sampled_softmax"}),
        # The pairwise term draws its own negatives from the checkpointed RNG.
        (TINY_MODEL, {"loss": "full_softmax", "bpr_weight": 0.5, "mask_history": True}),
        # One window per prefix: the sampler's order and the skip on resume must still agree.
        ({**BSAREC, "attention_dropout": 0.3}, {"samples": "prefixes"}),
        # The weight average and its warm-up counter travel in the checkpoint.
        (TINY_MODEL, {"ema_decay": 0.9}),
    ],
    ids=["sampled_softmax", "full_softmax+bpr+mask_history", "bsarec+prefixes", "ema"],
)
def test_resume_reaches_the_same_parameters(
    synthetic_data: Path, tmp_path: Path, model: dict[str, object], loss: dict[str, object]
) -> None:
    config = config_from_dict({"model": {**model, "dropout": 0.3}, "train": tiny_train(**loss)})
    straight = train(config, synthetic_data, tmp_path / "a", show_progress=False)
    first = train(config, synthetic_data, tmp_path / "b", stop_at_step=7, show_progress=False)
    assert first.stopped_by == "interrupted" and first.steps == 7
    resumed = train(config, synthetic_data, tmp_path / "b", resume=True, show_progress=False)
    assert resumed.steps == straight.steps == 12
    for kind in ("model", "average"):
        a = checkpoint_weights(tmp_path / "a", kind)
        b = checkpoint_weights(tmp_path / "b", kind)
        assert a.keys() == b.keys()
        assert (len(a) > 0) == (kind == "model" or "ema_decay" in loss)
        for name in a:
            assert torch.equal(a[name], b[name]), (kind, name)
    assert resumed.best_metrics == straight.best_metrics
    assert resumed.test_metrics == straight.test_metrics


def test_a_weight_average_is_what_validates_and_publishes(
    synthetic_data: Path, tmp_path: Path
) -> None:
    # One validation, at the last step: the version published must be the average then, not
    # the raw weights the optimizer left (which the checkpoint keeps for resuming).
    config = config_from_dict(
        {
            "model": {**TINY_MODEL, "dropout": 0.3},
            "train": tiny_train(max_steps=12, eval_every_steps=12, ema_decay=0.8),
        }
    )
    result = train(
        config, synthetic_data, tmp_path / "run", registry_dir=tmp_path / "reg",
        show_progress=False,
    )  # fmt: skip
    assert result.best_step == 12 and result.version is not None
    published = Registry(tmp_path / "reg").load_tensors(result.version)
    raw = checkpoint_weights(tmp_path / "run")
    average = checkpoint_weights(tmp_path / "run", "average")
    assert set(average) == {n for n, _ in result.model.named_parameters()}  # type: ignore[union-attr]
    for name, tensor in average.items():
        torch.testing.assert_close(published[name], tensor, rtol=0, atol=0, msg=name)
    moved = [n for n in average if not torch.equal(average[n], raw[n])]
    assert moved  # the average lags the raw weights
    with pytest.raises(ConfigError, match=r"train\.ema_decay"):
        config_from_dict({"model": TINY_MODEL, "train": tiny_train(ema_decay=1.0)})


def test_grad_clip_zero_turns_clipping_off(
    synthetic_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # TOML has no null, so a config turns clipping off with grad_clip = 0.
    calls: list[float] = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params: object, max_norm: float, *args: object, **kw: object) -> object:
        calls.append(max_norm)
        return clip(params, max_norm, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    for clip_value, expected in ((0.0, []), (0.5, [0.5, 0.5])):
        calls.clear()
        config = config_from_dict(
            {
                "model": TINY_MODEL,
                "train": tiny_train(max_steps=2, eval_every_steps=2, grad_clip=clip_value),
            }
        )
        train(config, synthetic_data, tmp_path / f"run-{clip_value}", show_progress=False)
        assert calls == expected
    with pytest.raises(ConfigError, match="grad_clip must be >= 0"):
        config_from_dict({"model": TINY_MODEL, "train": tiny_train(grad_clip=-1.0)})


@pytest.mark.parametrize(
    "overrides",
    [[], ["model.type=bsarec", "model.attention_dropout=0.0", "train.samples=prefixes"]],
    ids=["sasrec", "bsarec+prefixes"],
)
def test_two_gloo_processes_match_one(
    synthetic_data: Path, tmp_path: Path, overrides: list[str]
) -> None:
    """torchrun with 2 processes and the same global batch reaches the one-process parameters
    within 1e-5 (float32 sums in a different order; dropout is off so the runs are comparable)."""
    common = [
        "train",
        "--data",
        str(synthetic_data),
        "--config",
        str(write_config(tmp_path / "exp.toml")),
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "recloop.cli", *common, "--registry", str(tmp_path / "r1"),
         "--run-dir", str(tmp_path / "one"), "--threads", "1"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_port", str(_free_port()), "-m", "recloop.cli", *common,
         "--registry", str(tmp_path / "r2"), "--run-dir", str(tmp_path / "two"), "--threads", "1"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    a = Registry(tmp_path / "r1").load_tensors("latest")
    b = Registry(tmp_path / "r2").load_tensors("latest")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5, msg=name)
    versions = Registry(tmp_path / "r2").list()
    assert len(versions) == 1  # only rank 0 publishes
    manifest = Registry(tmp_path / "r2").manifest("latest").to_json()
    assert manifest["training"]["world_size"] == 2
    assert manifest["model"]["type"] == ("bsarec" if overrides else "sasrec")


def write_config(path: Path) -> Path:
    path.write_text(
        '[model]\ntype = "sasrec"\ndim = 16\nnum_blocks = 1\nnum_heads = 1\ndropout = 0.0\n'
        "[train]\nbatch_size = 32\nmax_length = 20\nmax_steps = 8\neval_every_steps = 4\n"
        "warmup_steps = 2\nlr = 3e-3\nseed = 3\n"
    )
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def warm() -> Iterator[WarmInterpreter]:
    """`recloop` processes forked from an interpreter that has imported torch (and
    torch._dynamo, which an optimizer imports): each command costs its own work only."""
    with warm_interpreter(["torch", "torch._dynamo"], dict(os.environ)) as interpreter:
        yield interpreter


def test_cli_train_eval_and_models(
    synthetic_data: Path, tmp_path: Path, warm: WarmInterpreter
) -> None:
    config = write_config(tmp_path / "exp.toml")
    registry = tmp_path / "reg"

    def run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return warm.run("recloop.cli", args, tmp_path / "output", timeout)

    done = run(
        "train", "--config", str(config), "--data", str(synthetic_data),
        "--registry", str(registry), "--run-dir", str(tmp_path / "run"), "train.max_steps=4",
        "train.eval_protocol=sampled100", timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "v000001"
    # Validation under the sampled protocol is reported under its own names; test is full.
    assert "valid: sampled100/HR@10 " in done.stdout
    assert "test:  HR@10 " in done.stdout
    evaluated = run(
        "eval", "--registry", str(registry), "--data", str(synthetic_data),
        "--protocol", "sampled100", "--json", timeout=300,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)
    assert metrics["version"] == "v000001" and 0.0 <= metrics["HR@10"] <= 1.0
    promoted = run("models", "promote", "--registry", str(registry), "v000001", timeout=60)
    assert promoted.returncode == 0 and "production is now v000001" in promoted.stdout
    listed = run("models", "list", "--registry", str(registry), timeout=60)
    assert "v000001" in listed.stdout
    bad = run(
        "train", "--config", str(config), "--data", str(synthetic_data),
        "--registry", str(registry), "train.learning_rate=1", timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "unknown key train.learning_rate" in bad.stderr


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text('[model]\ntype = "sasrec"\n[train]\nlr = "fast"\n')
    with pytest.raises(ConfigError, match=r"x\.toml: train\.lr must be float, got 'fast'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown section \[optim\]"):
        config_from_dict({"model": {"type": "sasrec"}, "optim": {}})
    with pytest.raises(ConfigError, match=r"train\.loss must be one of"):
        config_from_dict({"model": {"type": "sasrec"}, "train": {"loss": "hinge"}})
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        load_config(None, ["lr=3"])
    with pytest.raises(ConfigError, match=r"train\.eval_protocol must be one of"):
        config_from_dict({"model": {"type": "sasrec"}, "train": {"eval_protocol": "sampled"}})
    with pytest.raises(ConfigError, match=r"train\.batch_size must be >= 1"):
        config_from_dict({"model": {"type": "sasrec"}, "train": {"batch_size": 0}})


def test_train_compile_was_removed_with_the_reason(tmp_path: Path) -> None:
    # torch.compile measured slower than eager on CPU: the key says so, in a file or override.
    path = tmp_path / "x.toml"
    path.write_text('[model]\ntype = "sasrec"\n[train]\ncompile = true\n')
    reason = r"train\.compile was removed: torch\.compile measured slower than eager"
    with pytest.raises(ConfigError, match=rf"x\.toml: {reason}.*bench/results/train_speed\.json"):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"{reason}.*bench/train_speed\.py"):
        load_config(None, ["train.compile=false"])


def test_not_a_dataset_and_wrong_checkpoint(synthetic_data: Path, tmp_path: Path) -> None:
    from recloop.errors import DatasetError

    config = config_from_dict({"model": TINY_MODEL, "train": tiny_train(max_steps=2)})
    with pytest.raises(DatasetError, match="is not a recloop dataset"):
        train(config, tmp_path, tmp_path / "run", show_progress=False)
    train(config, synthetic_data, tmp_path / "run", stop_at_step=1, show_progress=False)
    other = config_from_dict(
        {"model": {**TINY_MODEL, "type": "hstu"}, "train": tiny_train(max_steps=2)}
    )
    with pytest.raises(ConfigError, match="checkpoint does not fit this model"):
        train(other, synthetic_data, tmp_path / "run", resume=True, show_progress=False)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda c: (c / "state.json").write_text("{"), r"cannot resume from this checkpoint"),
        (lambda c: (c / "state.json").write_bytes(b"\xff"), r"cannot resume .*0xff"),
        (lambda c: (c / "state.json").write_text("{}"), r"state.json: no step, epoch"),
        (lambda c: (c / "model.safetensors").write_bytes(b"\x00" * 4), r"cannot resume from"),
        (lambda c: (c / "rng.safetensors").unlink(), r"cannot resume .*No such file"),
    ],
)
def test_a_corrupt_checkpoint_is_one_error_naming_it(
    tmp_path: Path, corrupt: object, message: str
) -> None:
    from recloop.train import checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    state = {
        "step": 1, "epoch": 0, "batch_in_epoch": 1, "best_value": 0.0, "best_step": 0,
        "evals_since_best": 0, "best_metrics": {}, "history": [],
    }  # fmt: skip
    saved = checkpoint.save_checkpoint(tmp_path, model, optimizer, state)
    assert checkpoint.load_checkpoint(saved, model, optimizer)["step"] == 1
    corrupt(saved)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=message) as caught:
        checkpoint.load_checkpoint(saved, model, optimizer)
    assert str(saved) in str(caught.value) and "\n" not in str(caught.value)
    (tmp_path / checkpoint.LATEST).write_bytes(b"\xfe")
    with pytest.raises(ConfigError, match=r"LATEST: cannot read the checkpoint pointer"):
        checkpoint.latest_checkpoint(tmp_path)


def test_learning_rate_schedule() -> None:
    cfg = config_from_dict(
        {"model": TINY_MODEL, "train": {"lr": 1.0, "warmup_steps": 10, "schedule": "cosine"}}
    ).train
    assert lr_at(cfg, 0, 110) == pytest.approx(0.1)
    assert lr_at(cfg, 9, 110) == pytest.approx(1.0)
    assert lr_at(cfg, 60, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(cfg, 110, 110) == pytest.approx(0.1)


@pytest.mark.parametrize("model_type", ["sasrec", "hstu"])
def test_trimming_padding_columns_changes_nothing(model_type: str) -> None:
    from recloop.config import TrainConfig
    from recloop.data.batches import trim_left_padding
    from recloop.models.factory import build_model
    from recloop.train.losses import next_item_loss

    torch.manual_seed(0)
    model = build_model(model_type, {"num_items": 50, "max_length": 12, "dim": 16}).eval()
    inputs = torch.zeros(3, 12, dtype=torch.long)
    inputs[0, 8:] = torch.tensor([4, 5, 6, 7])
    inputs[1, 10:] = torch.tensor([9, 3])
    inputs[2, 7:] = torch.tensor([1, 2, 3, 4, 5])
    targets = torch.roll(inputs, -1, dims=1) * (inputs > 0)
    times = torch.cumsum(inputs > 0, dim=1) * 100
    batch = {"input_ids": inputs, "target_ids": targets, "timestamps": times}
    trimmed = trim_left_padding(batch)
    assert trimmed["input_ids"].shape == (3, 5)
    config = TrainConfig()
    with torch.no_grad():
        full, n_full = next_item_loss(model, model(inputs, times), targets, config, 50)
        short_hidden = model(trimmed["input_ids"], trimmed["timestamps"])
        short, n_short = next_item_loss(model, short_hidden, trimmed["target_ids"], config, 50)
    assert int(n_full) == int(n_short) == 8  # every real input but the last has a target
    torch.testing.assert_close(full, short, rtol=1e-5, atol=1e-5)


def test_eval_refuses_a_dataset_with_another_vocabulary(
    synthetic_data: Path, tmp_path: Path
) -> None:
    from recloop.registry.loading import check_vocabulary, load_model

    config = config_from_dict({"model": TINY_MODEL, "train": tiny_train(max_steps=2)})
    train(config, synthetic_data, tmp_path / "run", registry_dir=tmp_path / "reg",
          show_progress=False)  # fmt: skip
    other = tmp_path / "other"
    small = SyntheticConfig(num_users=50, num_items=30, num_topics=4, seed=9)
    prepare(with_source_order(generate_events(small)), {"kind": "synthetic"}, other)
    registry = Registry(tmp_path / "reg")
    items_sha = json.loads((other / "manifest.json").read_text())["files"]["items.parquet"]
    with pytest.raises(ConfigError, match="vocabulary mismatch: version v000001"):
        check_vocabulary(registry, "v000001", items_sha["sha256"])
    model, manifest = load_model(registry, "latest")
    assert manifest.id == "v000001" and not model.training
    done = subprocess.run(
        [sys.executable, "-m", "recloop.cli", "eval", "--registry", str(tmp_path / "reg"),
         "--data", str(other)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "vocabulary mismatch" in done.stderr


def test_optimizer_step_accumulates_chunks_like_one_batch() -> None:
    """The loop's step (also the online learner's): the losses of chunks, backpropagated one at
    a time, give the one-batch step; the schedule's lr is applied, then after_step, then the
    weight average moves."""
    from recloop.train.averaging import WeightAverage
    from recloop.train.loop import optimizer_step

    torch.manual_seed(0)
    inputs, targets = torch.randn(8, 3), torch.randn(8, 1)
    whole, chunked = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    chunked.load_state_dict(whole.state_dict())
    calls: list[str] = []

    def losses(model: torch.nn.Module, chunk: int) -> list[torch.Tensor]:
        return [
            ((model(inputs[i : i + chunk]) - targets[i : i + chunk]) ** 2).sum() / len(inputs)
            for i in range(0, len(inputs), chunk)
        ]

    results = []
    for model, chunk in ((whole, 8), (chunked, 3)):
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        average = WeightAverage(model, 0.5)
        optimizer_step(
            model, [optimizer], iter(losses(model, chunk)), grad_clip=0.5, lr=0.1,
            after_step=lambda: calls.append("after"), average=average,
        )  # fmt: skip
        assert optimizer.param_groups[0]["lr"] == 0.1 and average.updates == 1
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-6)
    assert calls == ["after", "after"]
