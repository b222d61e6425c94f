"""Incremental encoding for HSTU: per-user keys and values of every block, cached, so that new
events cost only their own positions.

HSTU's attention reads, for query i and key j <= i, only the keys and values of block inputs
(which are causal), a bias that depends on i - j and |t_i - t_j|, and the constant 1/max_length.
So when events are appended, the keys and values of every earlier position are unchanged and
need not be recomputed, PROVIDED nothing depends on the absolute position. That holds for
``position_embedding = "none"`` only: with "from_end" (row 0 = most recent) every past position's
input changes at every append, and :func:`check_incremental` refuses such a model.

Exact and approximate, when the window (``max_length``) is full and events keep coming, the
oldest positions leave the window. Deeper blocks' cached keys and values of the positions that
stay were computed while the dropped items were still in the window (they attended to them), so:

- ``window = "recompute"`` (default, exact): a user whose window would slide is re-encoded in
  full on the new window (what a plain forward does). Incremental while the window fills, full
  re-encodes after that.
- ``window = "drop-oldest"`` (approximate): the oldest cached positions are dropped and the
  rest kept, so every request stays incremental. The first block's keys and values stay exact
  (they depend on the item alone); deeper ones carry context from items that left the window.
  ``bench/incremental.py`` measures how far the user vectors drift from a full re-encode.

Everything here is tensors in, tensors out; storing states (bytes, budgets, versions) is
:mod:`recloop.serve.kv_cache`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from recloop.errors import ConfigError
from recloop.models.base import SequentialEncoder
from recloop.models.hstu import HSTU, HSTUBlock

WINDOW_POLICIES = ("recompute", "drop-oldest")


def check_incremental(model: SequentialEncoder) -> HSTU:
    """``model`` as an HSTU that can be encoded incrementally, or a ConfigError saying why not."""
    if not isinstance(model, HSTU):
        name = type(model).__name__
        raise ConfigError(
            f"incremental encoding needs an HSTU model (relative attention); this model is "
            f"{name}, whose past positions change when events are appended"
        )
    if model.config.position_embedding != "none":
        raise ConfigError(
            f'incremental encoding needs an HSTU model with position_embedding = "none"; this '
            f"one has {model.config.position_embedding!r}, an absolute position counted from the "
            f"most recent item, which changes every past position at each new event"
        )
    return model


@dataclass(frozen=True)
class UserKV:
    """One user's cached encoder state: the window encoded and every block's keys and values."""

    ids: torch.Tensor  # [n] int64, the window's item ids, oldest first
    timestamps: torch.Tensor | None  # [n] int64, or None when encoded without time
    keys: torch.Tensor  # [blocks, n, H * Dqk]
    values: torch.Tensor  # [blocks, n, H * Dv]
    vector: torch.Tensor  # [D], the user vector at the last position

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])

    def drop_oldest(self, count: int) -> UserKV:
        """The state without its ``count`` oldest positions (the rest kept as computed)."""
        times = self.timestamps[count:] if self.timestamps is not None else None
        keys, values = self.keys[:, count:], self.values[:, count:]
        return UserKV(self.ids[count:], times, keys, values, self.vector)


Times = Sequence[torch.Tensor] | None


class IncrementalHSTU:
    """Encodes users from their cached state plus new events (batched, any mix of lengths)."""

    def __init__(self, model: SequentialEncoder, window: str = "recompute") -> None:
        self.model = check_incremental(model)
        if window not in WINDOW_POLICIES:
            raise ConfigError(
                f"incremental window policy {window!r} is invalid: expected one of "
                f"{', '.join(WINDOW_POLICIES)}"
            )
        self.window = window
        self.max_length = int(self.model.config.max_length)
        self.timed = bool(self.model.config.use_time_bias)

    @torch.inference_mode()
    def encode(
        self, states: Sequence[UserKV | None], new_ids: Sequence[torch.Tensor], times: Times = None
    ) -> tuple[torch.Tensor, list[UserKV]]:
        """(user vectors [B, D], new states) for users with cached ``states`` (None: none yet)
        and their events since, ``new_ids`` [m_b] (and ``times`` [m_b] each, or None)."""
        if self.model.training:
            raise ConfigError("incremental encoding: the model must be in eval mode")
        times = times if self.timed else None
        if len(new_ids) != len(states) or (times is not None and len(times) != len(states)):
            raise ConfigError("incremental encoding: one state, id list and time list per user")
        results: list[UserKV | None] = list(states)
        full: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
        extend: list[tuple[int, UserKV, torch.Tensor, torch.Tensor | None]] = []
        for row, (state, ids) in enumerate(zip(states, new_ids, strict=True)):
            stamps = times[row] if times is not None else None
            self._check_row(row, state, ids, stamps)
            if ids.numel() == 0:
                continue  # nothing new: the cached vector stands
            if state is None:
                full.append((row, ids[-self.max_length :], _tail(stamps, self.max_length)))
            elif state.length + ids.numel() <= self.max_length:
                extend.append((row, state, ids, stamps))
            elif self.window == "recompute" or ids.numel() >= self.max_length:
                window = torch.cat([state.ids, ids])[-self.max_length :]
                joined = None if stamps is None else torch.cat([_times(state), stamps])
                full.append((row, window, _tail(joined, self.max_length)))
            else:  # drop-oldest: keep the cached positions that stay in the window
                kept = state.drop_oldest(state.length + ids.numel() - self.max_length)
                extend.append((row, kept, ids, stamps))
        if full:
            rows, windows, stamps_full = zip(*full, strict=True)
            for row, done in zip(
                rows, self.prefill(windows, _all_or_none(stamps_full)), strict=True
            ):
                results[row] = done
        if extend:
            rows, olds, news, stamps_new = zip(*extend, strict=True)
            for row, done in zip(
                rows, self.extend(olds, news, _all_or_none(stamps_new)), strict=True
            ):
                results[row] = done
        final = [state for state in results if state is not None]
        return torch.stack([state.vector for state in final]), final

    def _check_row(
        self, row: int, state: UserKV | None, ids: torch.Tensor, stamps: torch.Tensor | None
    ) -> None:
        if ids.ndim != 1 or ids.dtype != torch.int64:
            raise ConfigError(f"incremental encoding: user {row}: new ids must be 1-D int64")
        if state is None and ids.numel() == 0:
            raise ConfigError(f"incremental encoding: user {row}: no state and no events")
        if stamps is not None and stamps.shape != ids.shape:
            raise ConfigError(f"incremental encoding: user {row}: one timestamp per new id")
        if state is not None and (state.timestamps is None) != (stamps is None):
            raise ConfigError(
                f"incremental encoding: user {row}: the state was cached "
                f"{'without' if state.timestamps is None else 'with'} timestamps, the new "
                f"events come {'with' if stamps is not None else 'without'}"
            )

    def prefill(self, windows: Sequence[torch.Tensor], times: Times = None) -> list[UserKV]:
        """Full encode of each window (<= max_length ids, oldest first), keeping the keys and
        values of every block: the same computation as ``model(ids, times, last_only=True)``."""
        model = self.model
        ids = _right_aligned(windows, 0)  # [B, L] left-padded
        stamps = _right_aligned(times, 0) if times is not None else None
        x, keep, allowed, distance, buckets = model._embed(ids, stamps)
        x, keys, values = _run_blocks(model, x, distance, buckets, allowed)
        vectors = model._finish(x[:, -1]) * keep[:, -1]  # [B, D]
        return _split(windows, times, keys, values, vectors)

    def extend(
        self, states: Sequence[UserKV], new_ids: Sequence[torch.Tensor], times: Times = None
    ) -> list[UserKV]:
        """Encodes only the new positions of each user, reading the cached keys and values.
        Each state's length plus its new ids must fit in max_length."""
        model, dim = self.model, self.model.config.dim
        old = max(state.length for state in states)
        new = max(int(ids.numel()) for ids in new_ids)
        key_valid, key_pos, query_pos = _layout(states, new_ids, old, new)
        distance = query_pos.unsqueeze(-1) - key_pos.unsqueeze(-2)  # [B, m, n + m]
        allowed = ((distance >= 0) & key_valid.unsqueeze(-2)).unsqueeze(1).float()  # [B,1,m,n+m]
        distance = distance.clamp(0, self.max_length - 1)  # masked pairs: any index in range
        buckets = None
        if times is not None:
            stamps = _right_aligned(times, 0)  # [B, m]
            cached = _right_aligned([_times(state) for state in states], 0)  # [B, n]
            buckets = model.time_buckets(stamps, torch.cat([cached, stamps], 1))  # [B, m, n+m]
        ids = _right_aligned(new_ids, 0)  # [B, m]
        x = model.item_embedding(ids) * math.sqrt(dim) * (ids != 0).unsqueeze(-1)  # [B, m, D]
        old_keys = _stack_cache([state.keys for state in states], old)  # [blocks, B, n, *]
        old_values = _stack_cache([state.values for state in states], old)
        x, keys, values = _run_blocks(model, x, distance, buckets, allowed, old_keys, old_values)
        vectors = model._finish(x[:, -1])  # [B, D]: every row's last column is a real event
        fresh = _split(new_ids, times, keys, values, vectors)
        return [_joined(state, more) for state, more in zip(states, fresh, strict=True)]


def _run_blocks(
    model: HSTU,
    x: torch.Tensor,
    distance: torch.Tensor,
    buckets: torch.Tensor | None,
    allowed: torch.Tensor,
    cached_keys: torch.Tensor | None = None,
    cached_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The blocks over x [B, m, D], whose keys and values follow the cached ones ([blocks, B, n,
    *], or none: a full window); only the most recent position queries in the last block.
    -> (x [B, 1, D], the new positions' keys [blocks, B, m, *], values [blocks, B, m, *])."""
    keys, values = [], []
    last = len(model.blocks) - 1
    for index, block in enumerate(_blocks(model)):
        u, v, q, k = block.project(x)  # [B, m, *]
        keys.append(k)
        values.append(v)
        if cached_keys is not None and cached_values is not None:
            k = torch.cat([cached_keys[index], k], 1)  # [B, n + m, *]
            v = torch.cat([cached_values[index], v], 1)
        bias, mask, residual = block.bias(distance, buckets), allowed, x  # query dim: -2
        if index == last:
            u, q, residual = u[:, -1:], q[:, -1:], x[:, -1:]
            bias, mask = bias[..., -1:, :], mask[:, :, -1:]
        x = block.attend(residual, u, q, k, v, bias, mask)
    return x, torch.stack(keys), torch.stack(values)


def _blocks(model: HSTU) -> list[HSTUBlock]:
    blocks = [block for block in model.blocks if isinstance(block, HSTUBlock)]
    if len(blocks) != len(model.blocks):
        raise ConfigError("incremental encoding: the model's blocks are not HSTU blocks")
    return blocks


def _layout(
    states: Sequence[UserKV], new_ids: Sequence[torch.Tensor], old: int, new: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys are [cached, left-padded to ``old``] + [new, left-padded to ``new``] per user:
    (key valid [B, n + m] bool, key position [B, n + m], query position [B, m]) with positions
    counted from the user's oldest cached item; padding queries get -1 (they read nothing)."""
    batch = len(states)
    device = states[0].keys.device
    key_valid = torch.zeros(batch, old + new, dtype=torch.bool, device=device)
    key_pos = torch.zeros(batch, old + new, dtype=torch.int64, device=device)
    query_pos = torch.full((batch, new), -1, dtype=torch.int64, device=device)
    for row, (state, ids) in enumerate(zip(states, new_ids, strict=True)):
        n, m = state.length, int(ids.numel())
        key_valid[row, old - n : old] = True
        key_valid[row, old + new - m :] = True
        key_pos[row, old - n : old] = torch.arange(n, device=device)
        query_pos[row, new - m :] = torch.arange(n, n + m, device=device)
    key_pos[:, old:] = query_pos
    return key_valid, key_pos, query_pos


def _right_aligned(rows: Sequence[torch.Tensor], fill: int) -> torch.Tensor:
    """1-D tensors -> [B, longest], each right-aligned (left-padded with ``fill``)."""
    longest = max(int(row.numel()) for row in rows)
    out = torch.full((len(rows), longest), fill, dtype=rows[0].dtype, device=rows[0].device)
    for index, row in enumerate(rows):
        if row.numel():
            out[index, longest - row.numel() :] = row
    return out


def _stack_cache(tensors: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """[blocks, n_b, W] each -> [blocks, B, length, W], right-aligned, zero-padded."""
    blocks, _, width = tensors[0].shape
    out = tensors[0].new_zeros(blocks, len(tensors), length, width)
    for row, tensor in enumerate(tensors):
        if tensor.shape[1]:
            out[:, row, length - tensor.shape[1] :] = tensor
    return out


def _split(
    ids: Sequence[torch.Tensor],
    times: Times,
    keys: torch.Tensor,
    values: torch.Tensor,
    vectors: torch.Tensor,
) -> list[UserKV]:
    """Per-user states from right-aligned batch keys/values [blocks, B, L, *]."""
    states = []
    for row, row_ids in enumerate(ids):
        n = int(row_ids.numel())
        stamps = times[row].clone() if times is not None else None
        k, v = keys[:, row, keys.shape[2] - n :], values[:, row, values.shape[2] - n :]
        states.append(UserKV(row_ids.clone(), stamps, k.clone(), v.clone(), vectors[row].clone()))
    return states


def _joined(state: UserKV, more: UserKV) -> UserKV:
    times = None if more.timestamps is None else torch.cat([_times(state), more.timestamps])
    return UserKV(
        torch.cat([state.ids, more.ids]),
        times,
        torch.cat([state.keys, more.keys], 1),
        torch.cat([state.values, more.values], 1),
        more.vector,
    )


def _times(state: UserKV) -> torch.Tensor:
    if state.timestamps is None:
        raise ConfigError("incremental encoding: the state was cached without timestamps")
    return state.timestamps


def _tail(stamps: torch.Tensor | None, length: int) -> torch.Tensor | None:
    return stamps[-length:] if stamps is not None else None


def _all_or_none(stamps: Sequence[torch.Tensor | None]) -> list[torch.Tensor] | None:
    present = [stamp for stamp in stamps if stamp is not None]
    return present if len(present) == len(stamps) else None
