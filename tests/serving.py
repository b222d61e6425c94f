"""Test helpers for the HTTP service: a tiny trained registry, a real uvicorn server, and the
service configuration and known user for a ``trained`` registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recloop.config import config_from_dict
from recloop.data.dataset import SequenceDataset
from recloop.data.prepare import prepare, with_source_order
from recloop.data.synthetic import SyntheticConfig, generate_events
from recloop.serve.app import ServiceConfig
from recloop.serve.bundle import LoadOptions
from recloop.serve.server import serve_in_thread as running_service
from recloop.train.trainer import train

__all__ = [
    "API_KEY",
    "config_for",
    "known_user",
    "make_dataset",
    "running_service",
    "train_version",
]

API_KEY = "test-key"

TINY_MODEL = {"type": "sasrec", "dim": 16, "num_blocks": 1, "num_heads": 1, "dropout": 0.0}


def make_dataset(out: Path, *, num_items: int = 120, seed: int = 1) -> Path:
    config = SyntheticConfig(
        num_users=300, num_items=num_items, num_topics=8, mean_length=12.0, max_length=40, seed=seed
    )
    prepare(with_source_order(generate_events(config)), {"kind": "synthetic"}, out)
    return out


def train_version(
    data: Path,
    registry: Path,
    run_dir: Path,
    *,
    seed: int,
    steps: int = 40,
    model: dict[str, object] | None = None,
    samples: str = "windows",
) -> str:
    config = config_from_dict(
        {
            "model": model or TINY_MODEL,
            "train": {
                "samples": samples,
                "batch_size": 32,
                "max_length": 20,
                "lr": 3e-3,
                "warmup_steps": 2,
                "max_steps": steps,
                "eval_every_steps": steps,
                "seed": seed,
            },
        }
    )
    result = train(config, data, run_dir, registry_dir=registry, show_progress=False)
    assert result.version is not None
    return result.version


def config_for(trained: dict[str, Any], **overrides: Any) -> ServiceConfig:
    """The service over ``trained`` (keys "registry", "v1", "root"; "data" for known_user):
    version v1, the ONNX engine with its cache under root, writes behind ``API_KEY``."""
    values: dict[str, Any] = {
        "registry": trained["registry"],
        "ref": trained["v1"],
        "load": LoadOptions(engine="onnx", cache_dir=trained["root"] / "onnx-cache"),
        "api_key": API_KEY,
        "max_body_bytes": 64 * 1024,
    }
    values.update(overrides)
    return ServiceConfig(**values)


def known_user(trained: dict[str, Any]) -> tuple[str, list[int], list[str]]:
    """A user of the training data: (raw user id, dense item ids, raw item ids)."""
    dataset = SequenceDataset(trained["data"])
    user = 5
    offsets = dataset.sequences.offsets
    dense = [int(i) for i in dataset.sequences.items[offsets[user] : offsets[user + 1]]]
    raw_user = str(dataset.users.to_raw([user])[0])
    raw_items = [str(x) for x in dataset.items.to_raw(dense)]
    return raw_user, dense, raw_items
