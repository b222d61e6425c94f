"""Tests for the synthetic interaction-log generator (recloop.data.synthetic)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recloop.data import synthetic
from recloop.data.synthetic import (
    SyntheticConfig,
    count_events,
    generate_events,
    generate_log,
    item_structure,
    successor_table,
)
from recloop.errors import ConfigError

SMALL = SyntheticConfig(num_users=3_000, num_items=1_000, seed=7)


def _log(config: SyntheticConfig, chunk_users: int = 100_000) -> pl.DataFrame:
    return pl.concat(list(generate_events(config, chunk_users=chunk_users)))


@pytest.fixture(scope="module")
def small_log() -> pl.DataFrame:
    return _log(SMALL)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_frames() -> None:
    first = list(generate_events(SMALL, chunk_users=1_000))
    second = list(generate_events(SMALL, chunk_users=1_000))
    assert len(first) == len(second) == 3
    for a, b in zip(first, second, strict=True):
        assert a.equals(b)


def test_different_seed_gives_different_log(small_log: pl.DataFrame) -> None:
    other = _log(SyntheticConfig(num_users=3_000, num_items=1_000, seed=8))
    assert not other.equals(small_log)
    assert not np.array_equal(
        successor_table(SMALL), successor_table(SyntheticConfig(num_items=1_000, seed=8))
    )


def test_chunk_size_does_not_change_output() -> None:
    # More users than one internal random block, so chunks straddle block boundaries.
    users = 2 * synthetic._BLOCK_USERS + 123
    config = SyntheticConfig(num_users=users, num_items=500, mean_length=5.0, max_length=20)
    reference = _log(config, chunk_users=users)
    for chunk in (1_000, synthetic._BLOCK_USERS, 50_000):
        frames = list(generate_events(config, chunk_users=chunk))
        sizes = [f["user"].n_unique() for f in frames]
        assert sizes[:-1] == [chunk] * (len(frames) - 1)
        assert 0 < sizes[-1] <= chunk
        assert pl.concat(frames).equals(reference)
    tiny = SyntheticConfig(num_users=40, num_items=50, num_topics=5)
    assert _log(tiny, chunk_users=1).equals(_log(tiny))


# ----------------------------------------------------------------------------- invariants


def test_schema_ids_lengths_and_time_order(small_log: pl.DataFrame) -> None:
    df = small_log
    assert df.schema == pl.Schema({"user": pl.Int64, "item": pl.Int64, "timestamp": pl.Int64})
    assert df.height == count_events(SMALL)

    users = df["user"].to_numpy()
    assert users[0] == 0 and users[-1] == SMALL.num_users - 1
    assert np.all(np.diff(users) >= 0)  # grouped by user, increasing id
    lengths = np.bincount(users, minlength=SMALL.num_users)
    assert lengths.min() >= SMALL.min_length and lengths.max() <= SMALL.max_length
    # The lognormal is solved so the clipped mean is mean_length; allow 8% sampling error.
    assert abs(lengths.mean() - SMALL.mean_length) < 0.08 * SMALL.mean_length

    items = df["item"].to_numpy()
    assert items.min() >= 1 and items.max() <= SMALL.num_items

    ts = df["timestamp"].to_numpy()
    same_user = users[1:] == users[:-1]
    assert np.all(np.diff(ts)[same_user] > 0)  # strictly increasing within a user
    firsts = ts[np.r_[True, ~same_user]]  # [U] each user's first timestamp
    span = SMALL.time_span_days * 86_400
    assert firsts.min() >= SMALL.start_time and firsts.max() < SMALL.start_time + span
    # Users start all over the window, so a global time split cuts through most of them.
    assert np.ptp(firsts) > 0.9 * span


def test_popularity_is_power_law(small_log: pl.DataFrame) -> None:
    counts = np.bincount(small_log["item"].to_numpy(), minlength=SMALL.num_items + 1)[1:]
    ranked = np.sort(counts)[::-1].astype(np.float64)
    # Top 10% of items take >= 35% of events (uniform popularity would give 10%).
    assert ranked[: SMALL.num_items // 10].sum() >= 0.35 * ranked.sum()
    rank = np.arange(1, len(ranked) + 1)
    body = (rank >= 10) & (rank <= len(ranked) // 2)  # skip the flattened head and sparse tail
    slope = np.polyfit(np.log(rank[body]), np.log(ranked[body]), 1)[0]
    assert slope < -0.5
    # Empirical frequencies follow the generator's own popularity table.
    truth = item_structure(SMALL).popularity[1:]
    assert np.corrcoef(counts, truth)[0, 1] > 0.9


def test_item_structure_ground_truth() -> None:
    s = item_structure(SMALL)
    n = SMALL.num_items
    assert s.successor.shape == s.topic.shape == s.popularity.shape == (n + 1,)
    assert s.successor[0] == 0 and s.topic[0] == -1 and s.popularity[0] == 0.0
    assert math.isclose(s.popularity.sum(), 1.0)
    # Successors form a permutation of the items (cycles), each inside the item's topic.
    assert np.array_equal(np.sort(s.successor[1:]), np.arange(1, n + 1))
    assert np.array_equal(s.topic[s.successor[1:]], s.topic[1:])
    assert set(np.unique(s.topic[1:])) == set(range(SMALL.num_topics))
    assert np.array_equal(successor_table(SMALL), s.successor)


# ----------------------------------------------------------------------------- sequences


def _transitions(df: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    users = df["user"].to_numpy()
    items = df["item"].to_numpy()
    same = users[1:] == users[:-1]
    return items[:-1][same], items[1:][same]


def test_successor_rate_matches_config(small_log: pl.DataFrame) -> None:
    prev, nxt = _transitions(small_log)
    rate = float(np.mean(successor_table(SMALL)[prev] == nxt))
    # p_successor plus a little chance from the other modes.
    assert SMALL.p_successor - 0.02 <= rate <= SMALL.p_successor + 0.05
    no_series = SyntheticConfig(num_users=1_000, num_items=1_000, p_successor=0.0)
    prev, nxt = _transitions(_log(no_series))
    assert float(np.mean(successor_table(no_series)[prev] == nxt)) < 0.05


def test_markov_predictor_beats_popularity(small_log: pl.DataFrame) -> None:
    """Leave-last-out HR@10: bigram (previous item -> most frequent next items) vs most-popular."""
    df = small_log.with_columns(
        pos=pl.int_range(pl.len()).over("user"),
        n=pl.len().over("user"),
        prev=pl.col("item").shift(1).over("user"),
    )
    test = df.filter(pl.col("pos") == pl.col("n") - 1)
    train = df.filter(pl.col("pos") < pl.col("n") - 1)

    top_pop = (
        train.group_by("item")
        .len()
        .sort(["len", "item"], descending=[True, False])
        .head(10)["item"]
        .to_list()
    )
    hr_pop = float(test["item"].is_in(top_pop).mean())  # type: ignore[arg-type]

    bigram_top = (
        train.drop_nulls("prev")
        .group_by("prev", "item")
        .len()
        .sort(["prev", "len", "item"], descending=[False, True, False])
        .group_by("prev", maintain_order=True)
        .head(10)
    )
    hits = test.join(bigram_top, on=["prev", "item"], how="inner").height
    hr_bigram = hits / test.height

    assert hr_pop > 0.02  # the baseline is not degenerate
    assert hr_bigram >= 2.0 * hr_pop, (hr_bigram, hr_pop)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_users", 0),
        ("num_users", True),
        ("num_users", 2.5),
        ("num_items", -1),
        ("min_length", 0),
        ("max_length", 2),  # below min_length=3
        ("mean_length", 2.0),
        ("mean_length", 500.0),
        ("mean_length", float("nan")),
        ("mean_length", "20"),
        ("length_sigma", 0.0),
        ("num_topics", 0),
        ("num_topics", 10_000),  # more topics than items
        ("popularity_exponent", -1.0),
        ("popularity_offset", float("inf")),
        ("p_successor", 1.5),
        ("p_same_topic", -0.1),
        ("p_explore", 2),
        ("topics_per_user", 0),
        ("taste_concentration", 0.0),
        ("time_span_days", 0),
        ("mean_gap_seconds", 0.0),
        ("seed", -1),
        ("start_time", -5),
    ],
)
def test_bad_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        SyntheticConfig.from_dict({field: value})


def test_probabilities_must_sum_to_at_most_one() -> None:
    with pytest.raises(ConfigError, match="p_successor"):
        SyntheticConfig(p_successor=0.6, p_same_topic=0.5)
    SyntheticConfig(p_successor=0.3, p_same_topic=0.3, p_explore=0.4)  # exactly 1 is fine


def test_from_dict() -> None:
    config = SyntheticConfig.from_dict({"num_users": 10, "mean_length": 5, "seed": 3})
    assert config == SyntheticConfig(num_users=10, mean_length=5, seed=3)
    with pytest.raises(ConfigError, match="num_user'"):
        SyntheticConfig.from_dict({"num_user": 10})
    with pytest.raises(ConfigError, match="mapping"):
        SyntheticConfig.from_dict([("num_users", 10)])  # type: ignore[arg-type]


def test_bad_chunk_users() -> None:
    with pytest.raises(ConfigError, match="chunk_users"):
        next(generate_events(SMALL, chunk_users=0))


def test_constant_lengths() -> None:
    config = SyntheticConfig(
        num_users=50, num_items=40, num_topics=4, min_length=5, max_length=5, mean_length=5
    )
    assert _log(config).group_by("user").len()["len"].unique().to_list() == [5]


# ----------------------------------------------------------------------------- parquet


def test_generate_log_writes_parquet(tmp_path: Path) -> None:
    path = tmp_path / "out" / "events.parquet"
    rows = generate_log(SMALL, path, chunk_users=700)
    assert rows == count_events(SMALL)
    read = pl.read_parquet(path)
    assert read.height == rows
    assert read.equals(_log(SMALL))
    assert sorted(p.name for p in path.parent.iterdir()) == ["events.parquet"]


def test_generate_log_failure_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = synthetic.generate_events

    def failing(config: SyntheticConfig, chunk_users: int = 100_000) -> Iterator[pl.DataFrame]:
        yield next(real(config, chunk_users=chunk_users))
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "generate_events", failing)
    path = tmp_path / "events.parquet"
    with pytest.raises(RuntimeError, match="disk full"):
        generate_log(SMALL, path, chunk_users=1_000)
    assert list(tmp_path.iterdir()) == []
