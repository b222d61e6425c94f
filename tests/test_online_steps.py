"""What an online step learns (only the new events' positions by default), the frozen model's
optional scoring, and the learner's time per phase."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from recloop.errors import ConfigError
from recloop.online.config import OnlineConfig, load_online_config
from recloop.online.history import padded_chunks
from recloop.online.learner import OnlineLearner
from recloop.online.prequential import CSV_NAME, PLOT_NAME, PrequentialTotals, rank_targets
from recloop.online.steps import Sample
from recloop.online.timings import TIMINGS_NAME
from recloop.registry import Registry
from tests.online_helpers import event_log, pattern_events


def test_padded_chunks_put_targets_on_the_last_counted_positions_only() -> None:
    windows = [[4, 5], [1, 2, 3], [7, 8, 9, 10]]
    (chunk,) = list(padded_chunks(windows, 100, target_counts=[1, 2, 1]))
    inputs, targets = chunk
    assert inputs.tolist() == [[0, 0, 4], [0, 1, 2], [7, 8, 9]]
    assert targets.tolist() == [[0, 0, 5], [0, 2, 3], [0, 0, 10]]
    (more,) = list(padded_chunks(windows, 100, target_counts=[5, 0, 3]))
    assert more[1].tolist() == [[0, 0, 5], [0, 0, 0], [8, 9, 10]]  # clipped to the window


def test_new_positions_train_the_batch_events_and_the_last_replay_position(
    registry: Registry, tmp_path: Path
) -> None:
    config = OnlineConfig(batch_events=8, replay_windows=3, replay_positions=2)
    events = pattern_events(4)  # 8 events, two per pair of one user
    learner = OnlineLearner(registry, event_log(tmp_path / "e.db", events), config, tmp_path / "r")
    seen: list[list[Sample]] = []
    learner._train_step = lambda samples: seen.append(list(samples))  # type: ignore[method-assign]
    learner.process(learner.events.read(0, 8))
    assert len(seen) == config.steps_per_batch
    new_per_user: dict[str, int] = {}
    for event in events:
        new_per_user[event.user_id] = new_per_user.get(event.user_id, 0) + 1
    touched = seen[0][: len(new_per_user)]
    assert {len(s): c for s, c in touched} == {
        len(learner.sequences[u]): c for u, c in new_per_user.items()
    }
    assert [count for _, count in touched] == list(new_per_user.values())
    replay = seen[0][len(new_per_user) :]
    assert len(replay) == 3 and all(count == 2 for _, count in replay)


def test_all_positions_train_every_position(registry: Registry, tmp_path: Path) -> None:
    config = OnlineConfig(batch_events=8, replay_windows=2, train_positions="all")
    log = event_log(tmp_path / "e.db", pattern_events(4))
    learner = OnlineLearner(registry, log, config, tmp_path / "r")
    seen: list[list[Sample]] = []
    learner._train_step = lambda samples: seen.append(list(samples))  # type: ignore[method-assign]
    learner.process(learner.events.read(0, 8))
    assert seen and all(count is None for _, count in seen[0])


def test_windows_learned_at_one_position_run_the_last_block_for_it_alone(
    registry: Registry,
) -> None:
    from recloop.online.steps import _windows
    from recloop.registry.loading import load_model

    model, _ = load_model(registry, "latest")
    length = int(model.config.max_length)
    long = list(range(1, length + 10))
    singles, several, counts = _windows(
        model, [([1, 2, 3], 1), (long, None), ([4, 5], 3), ([7], 1)]
    )
    assert singles == [[1, 2, 3]]  # [7] has no target: dropped
    assert several == [[4, 5], long[-(length + 1) :]]  # sorted by length, windowed
    assert counts == [1, length]  # clipped to the window's positions; None = all of them


def test_rank_targets_matches_a_per_row_reference(registry: Registry) -> None:
    from recloop.registry.loading import load_model

    model, _ = load_model(registry, "latest")
    model.eval()
    rng = np.random.default_rng(0)
    num_items = int(model.item_embedding.num_items)
    prefixes = [rng.integers(1, num_items + 1, size=int(n)).tolist() for n in [1, 3, 7, 2, 5]]
    prefixes.append([])  # no history: never ranked
    targets = [int(t) for t in rng.integers(1, num_items + 1, size=len(prefixes))]
    targets[1] = prefixes[1][0]  # a repeat of a history item: masked, so not ranked
    targets[2] = num_items + 5  # an item the model lacks
    ranks = rank_targets(model, prefixes, targets)
    missing = np.iinfo(np.int64).max
    with torch.no_grad():
        for row, (prefix, target) in enumerate(zip(prefixes, targets, strict=True)):
            if row in (1, 2, 5):
                assert ranks[row] == missing
                continue
            logits = model.score(model.encode(torch.tensor([prefix])))[0]
            logits[torch.tensor(prefix)] = float("-inf")
            logits[0] = float("-inf")
            assert ranks[row] == int((logits > logits[target]).sum())


def test_the_frozen_model_can_be_left_unscored(registry: Registry, tmp_path: Path) -> None:
    config = OnlineConfig(batch_events=64, score_frozen=False, publish_every_seconds=0)
    log = event_log(tmp_path / "e.db", pattern_events(200))
    summary = OnlineLearner(registry, log, config, tmp_path / "run").run()
    assert summary.totals["scored"] == 400
    assert "frozen_HR@10" not in summary.totals and "online_HR@10" in summary.totals
    assert (tmp_path / "run" / PLOT_NAME).is_file()
    rows = (tmp_path / "run" / CSV_NAME).read_text().splitlines()
    assert rows[0].split(",")[-1] == "scored_frozen"
    assert all(row.split(",")[-1] == "0" for row in rows[1:])


def test_totals_written_before_frozen_scoring_was_optional_still_read() -> None:
    old: dict[str, Any] = {"events": 10, "scored": 8, "hits_online": 2, "hits_frozen": 1}
    totals = PrequentialTotals.from_json(old)
    assert totals.scored_frozen == 8
    assert totals.summary()["frozen_HR@10"] == pytest.approx(1 / 8)


def test_each_run_writes_its_time_per_phase(registry: Registry, tmp_path: Path) -> None:
    log = event_log(tmp_path / "e.db", pattern_events(100))
    config = OnlineConfig(batch_events=50, publish_every_events=100, publish_every_seconds=0)
    summary = OnlineLearner(registry, log, config, tmp_path / "run").run()
    written = json.loads((tmp_path / "run" / TIMINGS_NAME).read_text())
    assert written == summary.timings
    assert written["events"] == 200
    phases = written["phases"]
    assert {"read", "score", "score_frozen", "train", "publish", "plot", "other"} <= set(phases)
    assert sum(p["seconds"] for p in phases.values()) == pytest.approx(written["seconds"], abs=0.01)
    assert phases["train"]["seconds"] > 0


def test_train_positions_and_replay_positions_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"online\.train_positions must be one of"):
        load_online_config(None, ["online.train_positions=some"])
    with pytest.raises(ConfigError, match=r"online\.replay_positions must be >= 1"):
        OnlineConfig(replay_positions=0)


def test_context_targets_are_the_positions_the_main_loss_leaves_out() -> None:
    from recloop.online.steps import _context_targets

    (chunk,) = list(padded_chunks([[4, 5], [1, 2, 3, 6]], 100, target_counts=[1, 1]))
    inputs, targets = chunk
    assert targets.tolist() == [[0, 0, 5], [0, 0, 6]]
    assert _context_targets(inputs, targets).tolist() == [[0, 0, 0], [2, 3, 0]]


def test_context_negatives_learn_every_position_in_one_encoder_pass(
    registry: Registry, tmp_path: Path
) -> None:
    """With context_negatives, a window's older positions move the rows of their targets too
    (sampled softmax), while the main loss keeps only the new positions."""
    config = OnlineConfig(
        batch_events=8, replay_windows=0, context_negatives=4, train_dense=False,
        steps_per_batch=1,
    )  # fmt: skip
    learner = OnlineLearner(registry, event_log(tmp_path / "e.db", []), config, tmp_path / "r")
    assert learner._context_config is not None
    from recloop.online import steps

    calls: list[tuple[str, int]] = []
    real = steps.next_item_loss

    def spy(model: Any, hidden: Any, targets: Any, cfg: Any, *a: Any, **k: Any) -> Any:
        calls.append((cfg.loss, int((targets > 0).sum())))
        return real(model, hidden, targets, cfg, *a, **k)

    steps.next_item_loss = spy  # type: ignore[assignment]
    try:
        learner._train_step([([3, 4, 5, 6, 7], 1)])
    finally:
        steps.next_item_loss = real  # type: ignore[assignment]
    main = learner._loss_config.loss
    assert calls == [(main, 1), ("sampled_softmax", 3)]  # 1 new position + 3 older ones


def test_a_context_fraction_learns_a_random_share_of_the_older_positions(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """online.context_fraction < 1: each step's sampled loss sees about that share of the
    older positions (never the new ones), weighted by 1 / fraction."""
    config = OnlineConfig(
        batch_events=8, replay_windows=0, context_negatives=4, train_dense=False,
        steps_per_batch=1, context_fraction=0.5,
    )  # fmt: skip
    learner = OnlineLearner(registry, event_log(tmp_path / "e.db", []), config, tmp_path / "r")
    from recloop.online import steps

    seen: list[tuple[str, int]] = []
    real = steps.next_item_loss

    def spy(model: Any, hidden: Any, targets: Any, cfg: Any, *a: Any, **k: Any) -> Any:
        seen.append((cfg.loss, int((targets > 0).sum())))
        return real(model, hidden, targets, cfg, *a, **k)

    monkeypatch.setattr(steps, "next_item_loss", spy)
    length = int(learner.model.config.max_length)
    windows = [(list(range(1 + i, length + 2 + i)), 1) for i in range(20)]  # full windows
    learner._train_step(windows)
    (main, news), (context, older) = seen
    assert (main, news) == (learner._loss_config.loss, 20)
    everything = 20 * (length - 1)  # each window's positions but its new one
    assert context == "sampled_softmax" and 0.35 * everything <= older <= 0.65 * everything
    with pytest.raises(ConfigError, match=r"online\.context_fraction must be in \(0, 1\]"):
        OnlineConfig(context_fraction=0.0)
    with pytest.raises(ConfigError, match=r"online\.context_fraction must be in \(0, 1\]"):
        load_online_config(None, ["online.context_fraction=1.5"])


def test_bf16_auto_follows_the_cpu_and_true_or_false_are_kept(registry: Registry) -> None:
    from recloop.online.config import context_loss_config, loss_config
    from recloop.train.precision import native_bf16

    origin = registry.manifest(registry.list()[0].id)
    assert loss_config(OnlineConfig(), origin).bf16 is False  # measured slower in the step
    assert loss_config(OnlineConfig(bf16="auto"), origin).bf16 == native_bf16()
    assert loss_config(OnlineConfig(bf16=True), origin).bf16 is True
    context = context_loss_config(OnlineConfig(bf16=False))
    assert context is not None and context.bf16 is False
    with pytest.raises(ConfigError, match=r"online\.bf16"):
        load_online_config(None, ["online.bf16='sometimes'"])
