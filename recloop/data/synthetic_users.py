"""The user side of the synthetic generator (see ``recloop.data.synthetic`` for the story):
sequence lengths, and each block of users drawn from its own random stream, vectorised across
the users still active at each sequence position."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from recloop.data.synthetic import ItemTables, SyntheticConfig

# Users per independent random stream. Part of the dataset's definition: changing it changes
# every generated log. 16384 users x mean 20 events keeps a block's working set at a few MB.
BLOCK_USERS = 16_384
SECONDS_PER_DAY = 86_400


# ----------------------------------------------------------------------------- lengths


def _normal_sf(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """P(Z > x) for standard normal Z (Abramowitz-Stegun 7.1.26, abs. error < 1.5e-7)."""
    y = np.abs(x) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * y)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    half_erfc = 0.5 * poly * np.exp(-y * y)  # P(Z > |x|)
    return np.where(x >= 0, half_erfc, 1.0 - half_erfc)


def length_mu(config: SyntheticConfig) -> float:
    """Lognormal location mu with E[clip(rint(exp(mu + sigma Z)), min, max)] == mean_length."""
    a, b, sigma = config.min_length, config.max_length, config.length_sigma
    # E[L] = a + sum_{k=a}^{b-1} P(L > k), and L > k <=> exp(mu + sigma Z) >= k + 1/2.
    log_cuts = np.log(np.arange(a, b, dtype=np.float64) + 0.5)  # [b - a]

    def expected(mu: float) -> float:
        return a + float(_normal_sf((log_cuts - mu) / sigma).sum())

    # The expectation is increasing in mu; at lo every length is ~min, at hi every one ~max.
    lo, hi = math.log(0.5) - 12.0 * sigma, math.log(b + 0.5) + 12.0 * sigma
    for _ in range(64):  # bracket < ~300 wide: 64 halvings reach float precision
        mid = 0.5 * (lo + hi)
        if expected(mid) < config.mean_length:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def draw_lengths(
    rng: np.random.Generator, users: int, mu: float, config: SyntheticConfig
) -> npt.NDArray[np.int64]:
    z = rng.standard_normal(users)  # [B]
    log_len = np.minimum(mu + config.length_sigma * z, 700.0)  # 700: exp stays finite
    raw = np.rint(np.exp(log_len))
    return np.clip(raw, config.min_length, config.max_length).astype(np.int64)  # [B]


# ----------------------------------------------------------------------------- blocks


def block_rng(config: SyntheticConfig, block: int) -> np.random.Generator:
    seq = np.random.SeedSequence(config.seed, spawn_key=(1, block))
    return np.random.Generator(np.random.PCG64(seq))


def num_blocks(config: SyntheticConfig) -> int:
    return -(-config.num_users // BLOCK_USERS)


def block_size(config: SyntheticConfig, block: int) -> int:
    return min(BLOCK_USERS, config.num_users - block * BLOCK_USERS)


@dataclass(frozen=True)
class Block:
    lengths: npt.NDArray[np.int64]  # [B]
    items: npt.NDArray[np.int32]  # [E_b] 0-based item index, grouped by user, time order
    timestamps: npt.NDArray[np.int64]  # [E_b]


def generate_block(config: SyntheticConfig, tables: ItemTables, mu: float, block: int) -> Block:
    rng = block_rng(config, block)
    users = block_size(config, block)
    # Draw order is fixed (lengths first, so count_events can replay just that draw).
    lengths = draw_lengths(rng, users, mu, config)  # [B]
    span = config.time_span_days * SECONDS_PER_DAY
    starts = config.start_time + rng.integers(0, span, size=users, dtype=np.int64)  # [B]
    favourites, taste_cuts = _draw_tastes(rng, config, tables, users)
    offsets = np.zeros(users + 1, dtype=np.int64)  # [B + 1]
    np.cumsum(lengths, out=offsets[1:])
    items = _walk_items(rng, config, tables, lengths, offsets, favourites, taste_cuts)
    timestamps = _draw_timestamps(rng, config, lengths, offsets, starts)
    return Block(lengths=lengths, items=items, timestamps=timestamps)


def _draw_tastes(
    rng: np.random.Generator, config: SyntheticConfig, tables: ItemTables, users: int
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
    tables: ItemTables,
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
