"""Test helpers for the HTTP service: a tiny trained registry and a real uvicorn server."""

from __future__ import annotations

from pathlib import Path

from recloop.config import config_from_dict
from recloop.data.prepare import prepare, with_source_order
from recloop.data.synthetic import SyntheticConfig, generate_events
from recloop.serve.server import serve_in_thread as running_service
from recloop.train.trainer import train

__all__ = ["make_dataset", "running_service", "train_version"]

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
