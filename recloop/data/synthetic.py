"""Synthetic interaction logs for sequential recommendation: recloop's embedded default dataset.

The generative story
--------------------
*Items.* The ``num_items`` items are split into ``num_topics`` topics (genres, series, shops) of
varying size. Every item gets a global popularity rank (a random permutation, so ids say
nothing about popularity) and a Zipf-Mandelbrot weight ``(rank + popularity_offset) **
-popularity_exponent``. Inside each topic the items are arranged in a random cycle: the
*successor* of an item is the next one on its topic's cycle (the next episode of a series).

*Users.* Each user has a sparse taste: ``topics_per_user`` favourite topics, each drawn in
proportion to the topic's total item weight, with Dirichlet(``taste_concentration``) weights
over them (small concentration: one or two dominant topics). Drawing favourites by topic mass
makes the expected item marginal exactly the global power law above.

*Sequences.* A user's length is a rounded lognormal (heavy tail) clipped to
``[min_length, max_length]``; its location is solved so that the expected clipped length is
``mean_length``. The first item comes from the taste; afterwards, with the previous item ``p``:

    with prob. p_successor   next = successor(p)                        (series structure)
    with prob. p_same_topic  next ~ popularity within topic(p)          (short-term context)
    with prob. p_explore     next ~ global popularity                   (noise)
    otherwise                topic ~ user's taste, next ~ popularity within that topic

So the next item depends on the recent item (a Markov model or any sequential model can learn
the successor and the topic) and on the user's long-term taste, while a popularity baseline only
sees the power-law marginal.

*Time.* Each user starts at a uniform time in ``[start_time, start_time + time_span_days)``;
gaps between consecutive events are ``1 + floor(Exponential(mean_gap_seconds))`` seconds, so
timestamps are strictly increasing per user and users interleave in global time (a global
time split is meaningful).

Determinism and scale
---------------------
Users are generated in fixed blocks of ``_BLOCK_USERS``; block ``b`` draws from its own PCG64
stream seeded by ``SeedSequence(seed, spawn_key=(1, b))`` and the item
tables from ``spawn_key=(0,)``. The output therefore depends only on the config (and seed), never on
``chunk_users``: any chunking yields the same rows. Inside a block the only Python loop is over
sequence positions ``t``, vectorised across the users still active at ``t``; memory is bounded
by the item tables (O(num_items)) plus one block and one output chunk.

Raw ids: users are 0-based (``0..num_users-1``), items are 1-based (``1..num_items``), matching
recloop's convention that item 0 is padding.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from recloop.data.lengths import draw_lengths, lognormal_location
from recloop.errors import ConfigError, DatasetError

# Bound on max_length: the mean-matching solve costs O(max_length) per bisection step.
_MAX_LENGTH_LIMIT = 100_000
# Users per independent random stream. Part of the dataset's definition: changing it changes
# every generated log. 16384 users x mean 20 events keeps a block's working set at a few MB.
_BLOCK_USERS = 16_384
_SECONDS_PER_DAY = 86_400

SCHEMA: dict[str, pl.DataType] = {"user": pl.Int64(), "item": pl.Int64(), "timestamp": pl.Int64()}
_ARROW_SCHEMA = pa.schema(
    [("user", pa.int64()), ("item", pa.int64()), ("timestamp", pa.int64())],
)


@dataclass(frozen=True)
class SyntheticConfig:
    num_users: int = 5_000
    num_items: int = 2_000
    mean_length: float = 20.0  # expected events per user after clipping (mu is solved for it)
    min_length: int = 3
    max_length: int = 200
    # Lognormal sigma of the length: 1.0 gives a tail where ~3% of users exceed 4x the mean.
    length_sigma: float = 1.0
    # ~30-40 items per topic at the default size: small enough that "same topic" is informative.
    num_topics: int = 64
    # Zipf-Mandelbrot weight (rank + offset) ** -exponent. Exponent 1 is the classic Zipf tail;
    # the offset flattens the head so the top few items do not take a third of all traffic
    # (real logs have a heavy tail but a softer head).
    popularity_exponent: float = 1.0
    popularity_offset: float = 5.0
    # Transition mixture (the rest, 1 - sum, is "topic from the user's long-term taste").
    p_successor: float = 0.3  # next episode: the learnable item-to-item signal
    p_same_topic: float = 0.3  # stay in the previous item's topic: short-term context
    p_explore: float = 0.05  # global-popularity noise, so no user is confined to their topics
    topics_per_user: int = 3
    # Dirichlet concentration over a user's favourite topics; < 1 makes one topic dominate.
    taste_concentration: float = 0.5
    time_span_days: int = 365  # users' first events are spread uniformly over this window
    mean_gap_seconds: float = 6 * 3600.0  # mean time between a user's consecutive events
    seed: int = 0
    start_time: int = 1_700_000_000  # Unix seconds of the window start (2023-11-14)

    def __post_init__(self) -> None:
        _check_int("num_users", self.num_users, low=1)
        _check_int("num_items", self.num_items, low=1)
        _check_int("min_length", self.min_length, low=1)
        _check_int("max_length", self.max_length, low=self.min_length, high=_MAX_LENGTH_LIMIT)
        _check_float("mean_length", self.mean_length, low=self.min_length, high=self.max_length)
        _check_float("length_sigma", self.length_sigma, low=0.0, low_open=True, high=5.0)
        _check_int("num_topics", self.num_topics, low=1, high=self.num_items)
        _check_float("popularity_exponent", self.popularity_exponent, low=0.0, high=10.0)
        _check_float("popularity_offset", self.popularity_offset, low=0.0)
        _check_float("p_successor", self.p_successor, low=0.0, high=1.0)
        _check_float("p_same_topic", self.p_same_topic, low=0.0, high=1.0)
        _check_float("p_explore", self.p_explore, low=0.0, high=1.0)
        total = self.p_successor + self.p_same_topic + self.p_explore
        if total > 1.0 + 1e-12:
            raise ConfigError(
                "p_successor + p_same_topic + p_explore must be <= 1, got "
                f"{self.p_successor!r} + {self.p_same_topic!r} + {self.p_explore!r} = {total!r}"
            )
        _check_int("topics_per_user", self.topics_per_user, low=1, high=self.num_topics)
        _check_float("taste_concentration", self.taste_concentration, low=0.0, low_open=True)
        _check_int("time_span_days", self.time_span_days, low=1, high=100 * 365)
        _check_float("mean_gap_seconds", self.mean_gap_seconds, low=0.0, low_open=True, high=1e8)
        _check_int("seed", self.seed, low=0, high=2**63 - 1)
        # Upper bound leaves int64 headroom for the span, the gaps and their sums.
        _check_int("start_time", self.start_time, low=0, high=2**52)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> SyntheticConfig:
        """Build from a plain mapping (a parsed YAML/JSON section); unknown keys are errors."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"synthetic config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise ConfigError(
                    f"unknown synthetic config key {key!r}; known keys: {', '.join(sorted(known))}"
                )
        return cls(**d)  # type: ignore[arg-type]  # values are checked in __post_init__


def _check_int(name: str, value: object, *, low: int, high: int | None = None) -> None:
    # bool is an int subclass, but True as a user count is a config mistake.
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name} must be {bound}, got {value!r}")


def _check_float(
    name: str,
    value: object,
    *,
    low: float,
    high: float | None = None,
    low_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    v = float(value)
    bad_low = v <= low if low_open else v < low
    if not math.isfinite(v) or bad_low or (high is not None and v > high):
        lo = f"({low}" if low_open else f"[{low}"
        hi = f"{high}]" if high is not None else "inf)"
        raise ConfigError(f"{name} must be a finite number in {lo}, {hi}, got {value!r}")


# ----------------------------------------------------------------------------- item tables


@dataclass(frozen=True)
class _Tables:
    """Item-side structure, internal 0-based item index j (raw id j + 1)."""

    topic: npt.NDArray[np.int32]  # [N] topic of each item
    weight: npt.NDArray[np.float64]  # [N] unnormalised popularity weight
    successor: npt.NDArray[np.int32]  # [N] next item on the topic's cycle
    by_topic: npt.NDArray[np.int32]  # [N] items sorted by topic (random order inside a topic)
    cum: npt.NDArray[np.float64]  # [N] cumulative weight along by_topic
    topic_lo: npt.NDArray[np.float64]  # [K] cum value just before the topic's first item
    topic_mass: npt.NDArray[np.float64]  # [K] total weight of the topic
    topic_last: npt.NDArray[np.int64]  # [K] index in by_topic of the topic's last item
    topic_cdf: npt.NDArray[np.float64]  # [K] cumulative topic mass / total, ends at 1


def _build_tables(config: SyntheticConfig) -> _Tables:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(config.seed, spawn_key=(0,))))
    n, k = config.num_items, config.num_topics

    # Topic sizes vary (uniform proportions on the simplex); the first K items of a random
    # permutation seed one item per topic so no topic is empty.
    proportions = rng.dirichlet(np.ones(k))  # [K]
    topic = np.searchsorted(np.cumsum(proportions), rng.random(n), side="right")  # [N]
    np.minimum(topic, k - 1, out=topic)  # the last cumsum can round just below 1
    topic[rng.permutation(n)[:k]] = np.arange(k)
    topic32: npt.NDArray[np.int32] = topic.astype(np.int32)

    rank = rng.permutation(n).astype(np.float64) + 1.0  # [N] 1 = most popular
    weight = (rank + config.popularity_offset) ** -config.popularity_exponent  # [N]

    # Sort by topic with a random order inside each topic: that order is the successor cycle.
    by_topic = np.lexsort((rng.random(n), topic32)).astype(np.int32)  # [N]
    sizes = np.bincount(topic32, minlength=k)  # [K] >= 1 each
    ends = np.cumsum(sizes)  # [K] exclusive end of each topic in by_topic
    starts = ends - sizes  # [K]
    nxt = np.arange(1, n + 1, dtype=np.int64)  # [N] position of the successor in by_topic
    nxt[ends - 1] = starts  # close each topic's cycle (a one-item topic is its own successor)
    successor = np.empty(n, dtype=np.int32)  # [N]
    successor[by_topic] = by_topic[nxt]

    cum = np.cumsum(weight[by_topic])  # [N]
    cum_ext = np.concatenate(([0.0], cum))  # [N + 1]
    topic_lo = cum_ext[starts]  # [K]
    topic_mass = cum_ext[ends] - topic_lo  # [K]
    topic_cdf = np.cumsum(topic_mass) / cum[-1]  # [K]
    topic_cdf[-1] = 1.0
    return _Tables(
        topic=topic32,
        weight=weight,
        successor=successor,
        by_topic=by_topic,
        cum=cum,
        topic_lo=topic_lo,
        topic_mass=topic_mass,
        topic_last=(ends - 1).astype(np.int64),
        topic_cdf=topic_cdf,
    )


@dataclass(frozen=True)
class ItemStructure:
    """Ground truth of the item side, indexed by raw item id (index 0 is padding)."""

    topic: npt.NDArray[np.int64]  # [N + 1] topic of each item; -1 at index 0
    popularity: npt.NDArray[np.float64]  # [N + 1] global sampling probability; 0 at index 0
    successor: npt.NDArray[np.int64]  # [N + 1] raw id of the successor; 0 at index 0


def item_structure(config: SyntheticConfig) -> ItemStructure:
    """Topic, popularity and successor of every item, exactly as the generator uses them."""
    t = _build_tables(config)
    topic = np.concatenate(([-1], t.topic.astype(np.int64)))  # [N + 1]
    popularity = np.concatenate(([0.0], t.weight / t.weight.sum()))  # [N + 1]
    successor = np.concatenate(([0], t.successor.astype(np.int64) + 1))  # [N + 1]
    return ItemStructure(topic=topic, popularity=popularity, successor=successor)


def successor_table(config: SyntheticConfig) -> npt.NDArray[np.int64]:
    """``successor_table(c)[i]`` is the raw id of item ``i``'s successor ([N + 1], 0 -> 0)."""
    return item_structure(config).successor


# ----------------------------------------------------------------------------- lengths


def _length_mu(config: SyntheticConfig) -> float:
    """The lognormal location whose clipped, rounded lengths have mean ``mean_length``."""
    return lognormal_location(
        config.min_length, config.max_length, config.length_sigma, config.mean_length
    )


def _draw_lengths(
    rng: np.random.Generator, users: int, mu: float, config: SyntheticConfig
) -> npt.NDArray[np.int64]:
    return draw_lengths(rng, users, mu, config.length_sigma, config.min_length, config.max_length)


# ----------------------------------------------------------------------------- blocks


def _block_rng(config: SyntheticConfig, block: int) -> np.random.Generator:
    seq = np.random.SeedSequence(config.seed, spawn_key=(1, block))
    return np.random.Generator(np.random.PCG64(seq))


def _num_blocks(config: SyntheticConfig) -> int:
    return -(-config.num_users // _BLOCK_USERS)


def _block_size(config: SyntheticConfig, block: int) -> int:
    return min(_BLOCK_USERS, config.num_users - block * _BLOCK_USERS)


@dataclass(frozen=True)
class _Block:
    lengths: npt.NDArray[np.int64]  # [B]
    items: npt.NDArray[np.int32]  # [E_b] 0-based item index, grouped by user, time order
    timestamps: npt.NDArray[np.int64]  # [E_b]


def _generate_block(config: SyntheticConfig, tables: _Tables, mu: float, block: int) -> _Block:
    rng = _block_rng(config, block)
    users = _block_size(config, block)
    # Draw order is fixed (lengths first, so count_events can replay just that draw).
    lengths = _draw_lengths(rng, users, mu, config)  # [B]
    span = config.time_span_days * _SECONDS_PER_DAY
    starts = config.start_time + rng.integers(0, span, size=users, dtype=np.int64)  # [B]
    favourites, taste_cuts = _draw_tastes(rng, config, tables, users)
    offsets = np.zeros(users + 1, dtype=np.int64)  # [B + 1]
    np.cumsum(lengths, out=offsets[1:])
    items = _walk_items(rng, config, tables, lengths, offsets, favourites, taste_cuts)
    timestamps = _draw_timestamps(rng, config, lengths, offsets, starts)
    return _Block(lengths=lengths, items=items, timestamps=timestamps)


def _draw_tastes(
    rng: np.random.Generator, config: SyntheticConfig, tables: _Tables, users: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Each user's favourite topics [B, M] and the cumulative cuts of their taste over them
    [B, M-1] (a uniform u picks favourite #(cuts below u))."""
    m = config.topics_per_user
    favourites = np.searchsorted(tables.topic_cdf, rng.random((users, m)), side="right")  # [B, M]
    np.minimum(favourites, config.num_topics - 1, out=favourites)
    taste = rng.gamma(config.taste_concentration, size=(users, m))  # [B, M]
    # With a tiny concentration every draw of a row can underflow to 0; the guard keeps the
    # division finite and such a user simply gets their last favourite (see the cuts below).
    taste /= np.maximum(taste.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    # Only the first M-1 cumulative cuts: slot = #cuts below u lands in [0, M-1] even when
    # rounding leaves the full sum a hair under 1.
    taste_cuts = np.cumsum(taste, axis=1)[:, : m - 1]  # [B, M-1]
    return favourites, taste_cuts


def _walk_items(
    rng: np.random.Generator,
    config: SyntheticConfig,
    tables: _Tables,
    lengths: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    favourites: npt.NDArray[np.int64],
    taste_cuts: npt.NDArray[np.float64],
) -> npt.NDArray[np.int32]:
    """Every user's item sequence [E_b], one time step for all users at once: each next item
    is the previous one's successor, another of its topic, an exploration, or from taste."""
    m = config.topics_per_user
    users = len(lengths)
    items = np.empty(int(offsets[-1]), dtype=np.int32)  # [E_b]
    # Users sorted by decreasing length: at step t the active users are a prefix.
    order = np.argsort(-lengths, kind="stable")  # [B]
    neg_sorted_len = -lengths[order]  # [B] ascending
    pos = offsets[:-1][order]  # [B] output position of each sorted user's first event
    fav_flat = favourites[order].astype(np.int64).ravel()  # [B * M]
    cuts = np.ascontiguousarray(taste_cuts[order])  # [B, M-1]
    prev = np.zeros(users, dtype=np.int32)  # [B] previous item of each sorted user
    p_succ = config.p_successor
    p_stay = p_succ + config.p_same_topic
    p_expl = p_stay + config.p_explore
    total_mass = float(tables.cum[-1])

    for t in range(int(lengths.max(initial=0))):
        n = int(np.searchsorted(neg_sorted_len, -t, side="left"))  # users with length > t
        mode_u, topic_u, item_u = rng.random((3, n))  # [n] each: mode, topic, item uniforms
        p = prev[:n]  # [n]
        slot = (cuts[:n] < topic_u[:, None]).sum(axis=1)  # [n] in [0, M-1]
        topic = fav_flat[np.arange(n, dtype=np.int64) * m + slot]  # [n] taste topic
        if t > 0:
            stay = (mode_u >= p_succ) & (mode_u < p_stay)  # [n]
            topic = np.where(stay, tables.topic[p], topic)
            explore = (mode_u >= p_stay) & (mode_u < p_expl)  # [n]
        else:  # no previous item: only taste or exploration
            explore = mode_u < config.p_explore
        target = np.where(
            explore, item_u * total_mass, tables.topic_lo[topic] + item_u * tables.topic_mass[topic]
        )  # [n]
        # Searching with sorted keys is ~6x faster (numpy reuses the last position as a
        # bound and the probes stay in cache); the result is identical.
        key_order = np.argsort(target)  # [n]
        idx = np.empty(n, dtype=np.int64)  # [n]
        idx[key_order] = np.searchsorted(tables.cum, target[key_order], side="right")
        # Rounding can push lo + u * mass onto the topic's upper edge: clamp inside it.
        np.minimum(idx, np.where(explore, config.num_items - 1, tables.topic_last[topic]), out=idx)
        nxt = tables.by_topic[idx]  # [n]
        if t > 0:
            nxt = np.where(mode_u < p_succ, tables.successor[p], nxt)
        items[pos[:n] + t] = nxt
        prev[:n] = nxt
    return items


def _draw_timestamps(
    rng: np.random.Generator,
    config: SyntheticConfig,
    lengths: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    starts: npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]:
    """Strictly increasing times [E_b]: gap = 1 + floor(Exp(mean)); the first event of each
    user sits at their start."""
    total = int(offsets[-1])
    gaps = 1 + np.floor(rng.exponential(config.mean_gap_seconds, size=total)).astype(np.int64)
    first = offsets[:-1]  # [B]
    gaps[first] = starts
    cs = np.cumsum(gaps)  # [E_b]
    return cs - np.repeat(cs[first] - starts, lengths)  # [E_b] segmented cumsum


# ----------------------------------------------------------------------------- public API


def count_events(config: SyntheticConfig) -> int:
    """Rows ``generate_events`` will yield, computed by replaying only the length draws."""
    mu = _length_mu(config)
    total = 0
    for block in range(_num_blocks(config)):
        rng = _block_rng(config, block)
        total += int(_draw_lengths(rng, _block_size(config, block), mu, config).sum())
    return total


def _frame(
    first_user: int,
    lengths: npt.NDArray[np.int64],
    items: npt.NDArray[np.int32],
    timestamps: npt.NDArray[np.int64],
) -> pl.DataFrame:
    users = np.repeat(np.arange(first_user, first_user + len(lengths), dtype=np.int64), lengths)
    return pl.DataFrame(
        {
            "user": users,
            "item": items.astype(np.int64) + 1,  # raw item ids are 1-based
            "timestamp": np.ascontiguousarray(timestamps),
        },
        schema=SCHEMA,
    )


def generate_events(config: SyntheticConfig, chunk_users: int = 100_000) -> Iterator[pl.DataFrame]:
    """Yield the log as polars DataFrames of ``chunk_users`` users each (the last may be smaller).

    Columns: ``user`` (Int64, raw id 0..num_users-1), ``item`` (Int64, raw id 1..num_items),
    ``timestamp`` (Int64, Unix seconds). Rows are grouped by user in increasing user id and each
    user's rows are in strictly increasing time. The concatenated output is identical for every
    ``chunk_users``.
    """
    _check_int("chunk_users", chunk_users, low=1)
    tables = _build_tables(config)
    mu = _length_mu(config)

    # Blocks not yet yielded, concatenated only once a chunk's worth has arrived (linear cost
    # for any chunk size): pieces of (lengths [B'], items [E'], timestamps [E']).
    pieces: list[_Block] = []
    pending = 0
    next_user = 0
    blocks = _num_blocks(config)
    for block in range(blocks):
        pieces.append(_generate_block(config, tables, mu, block))
        pending += len(pieces[-1].lengths)
        last = block == blocks - 1
        if pending < chunk_users and not last:
            continue
        lengths = np.concatenate([p.lengths for p in pieces])  # [P]
        items = np.concatenate([p.items for p in pieces])  # [sum of lengths]
        stamps = np.concatenate([p.timestamps for p in pieces])  # [sum of lengths]
        while len(lengths) >= chunk_users or (last and len(lengths) > 0):
            k = min(chunk_users, len(lengths))
            e = int(lengths[:k].sum())
            yield _frame(next_user, lengths[:k], items[:e], stamps[:e])
            next_user += k
            lengths, items, stamps = lengths[k:], items[e:], stamps[e:]
        pieces = [_Block(lengths=lengths, items=items, timestamps=stamps)]
        pending = len(lengths)


def generate_log(config: SyntheticConfig, path: Path, chunk_users: int = 100_000) -> int:
    """Write the whole log to one Parquet file (columns user, item, timestamp); return its rows.

    Streams chunk by chunk into ``<path>.tmp`` and renames it onto ``path`` only when complete,
    so a crash never leaves a truncated file under the final name.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rows = 0
    try:
        if path.is_dir():
            raise DatasetError(f"{path}: is a directory, expected a Parquet file to write")
        path.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(tmp, _ARROW_SCHEMA) as writer:
            for frame in generate_events(config, chunk_users=chunk_users):
                writer.write_table(frame.to_arrow().cast(_ARROW_SCHEMA))
                rows += frame.height
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # read-only place, a parent that is a file, disk full
            reason = exc.strerror or str(exc).splitlines()[0]
            if isinstance(exc, FileExistsError | NotADirectoryError):  # from mkdir
                reason = f"{exc.filename} is not a directory"
            raise DatasetError(f"{path}: cannot write the log ({reason})") from exc
        raise
    return rows
