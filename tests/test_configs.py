"""Every frozen experiment config under configs/ loads, validates and builds its model."""

from __future__ import annotations

from pathlib import Path

import pytest

from recloop.config import load_config
from recloop.models.factory import build_model

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.toml"))


def test_there_are_frozen_configs() -> None:
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_is_valid(path: Path) -> None:
    experiment = load_config(path)
    model = {k: v for k, v in experiment.model.items() if k != "type"}
    model |= {"num_items": 100, "max_length": experiment.train.max_length}
    built = build_model(experiment.model["type"], model)
    assert sum(p.numel() for p in built.parameters()) > 0
