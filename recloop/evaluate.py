"""Offline evaluation of next-item prediction: full ranking and the sampled-100 protocol.

Both protocols follow ``../shared/BENCHMARKS.md`` section 1. For each evaluation example
(user, history = ``source.items[start:end]``, target) the model encodes the last
``max_length`` history items (left-padded, with their timestamps) into a user vector, and the
target's *rank* is the number of competing items that score at least as high as the target:

    rank = #(items scoring strictly higher) + #(OTHER items scoring exactly equal)

Ties are broken pessimistically, so a model that gives every item the same score ranks every
target last and gets no credit. From 0-based ranks:

    HR@K = mean(rank < K)    NDCG@K = mean(1 / log2(rank + 2) if rank < K else 0)
    MRR  = mean(1 / (rank + 1))

Full ranking (the default, and the one that matters): the competitors are all catalogue items
1..num_items. The *masked* variant (reported as ``HR@10`` ...) removes the items of the user's
history ``items[start:end]`` (its whole history, not only the last ``max_length`` items the
model sees) from the competitors, i.e. scores them -inf. The target itself is never masked,
even when the user interacted with it before: a repeat interaction is a fair target. The
*unmasked* variant (``unmasked/HR@10`` ...) ranks against every item and comes from the same
pass. Memory stays bounded for 1M users x 1M items: users go in batches of
``user_batch_size`` and items in chunks of ``item_chunk_size`` columns, each chunk's scores
``[B, C]`` are compared with the target scores and dropped, and masking subtracts the history
items counted in a chunk by gathering their scores from that same chunk (so masked and
unmasked counts see bit-identical scores).

Sampled-100 (only to compare with the SASRec paper, arXiv 1808.09781): the competitors are
``num_negatives`` items drawn uniformly, with replacement as in the paper's code, from the
items the user NEVER interacted with (its whole sequence in ``source``, not only the history).
Draws come from seeded numpy Generators keyed by (seed, block of example positions), so the
negatives of an example do not depend on the batch size, on ``max_users`` or on the number of
distributed ranks. ``max_users`` evaluates a seeded random subset of the examples (the paper's
code uses 10,000); it applies to either protocol and the result records it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist

from recloop.data.batches import last_items
from recloop.data.sequences import Sequences
from recloop.data.splits import EvalExamples
from recloop.errors import ConfigError, DatasetError
from recloop.models.base import SequentialEncoder

__all__ = [
    "EvalConfig",
    "FullRanks",
    "evaluate",
    "metrics_from_ranks",
    "ranks_full",
    "ranks_sampled",
    "sample_negatives",
    "select_examples",
]

Protocol = Literal["full", "sampled100"]
Progress = Callable[[int], None]
IntArray = npt.NDArray[np.int64]

# Negatives are drawn per block of this many example positions, one Generator per block: a
# fixed block keeps the draws independent of user_batch_size and of the distributed sharding.
SAMPLE_BLOCK = 4096
# Histories encoded per model call, grouped by length (see _encode).
ENCODE_GROUP = 128
# Distinct streams of the seeded Generators, so the subset and the negatives are independent.
_SUBSET_STREAM = 1
_NEGATIVES_STREAM = 2


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate. ``max_length`` must match the model's context length."""

    max_length: int = 50
    ks: tuple[int, ...] = (5, 10, 20, 50)  # cut-offs of HR@K / NDCG@K
    user_batch_size: int = 512  # examples encoded and scored together
    item_chunk_size: int = 131_072  # catalogue columns scored at once (full ranking)
    protocol: Protocol = "full"
    num_negatives: int = 100  # sampled100 only
    max_users: int | None = None  # evaluate a seeded random subset of this many examples
    seed: int = 0  # seeds the subset and the sampled negatives
    use_timestamps: bool = True  # pass timestamps to the encoder (False: None)

    def __post_init__(self) -> None:
        if isinstance(self.ks, list):  # from TOML
            object.__setattr__(self, "ks", tuple(self.ks))
        for name in ("max_length", "user_batch_size", "item_chunk_size", "num_negatives"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"eval.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.ks, tuple) or not self.ks:
            raise ConfigError(f"eval.ks must be a non-empty tuple of integers, got {self.ks!r}")
        for k in self.ks:
            if not _is_int(k) or k < 1:
                raise ConfigError(f"eval.ks must hold integers >= 1, got {k!r}")
        if len(set(self.ks)) != len(self.ks):
            raise ConfigError(f"eval.ks has duplicates: {self.ks!r}")
        if self.protocol not in ("full", "sampled100"):
            raise ConfigError(
                f"eval.protocol must be 'full' or 'sampled100', got {self.protocol!r}"
            )
        if self.max_users is not None and (not _is_int(self.max_users) or self.max_users < 1):
            raise ConfigError(
                f"eval.max_users must be an integer >= 1 or absent, got {self.max_users!r}"
            )
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"eval.seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.use_timestamps, bool):
            raise ConfigError(f"eval.use_timestamps must be a boolean, got {self.use_timestamps!r}")


# --- metrics -------------------------------------------------------------------------------


def _metric_names(ks: Sequence[int]) -> list[str]:
    names = []
    for k in ks:
        names += [f"HR@{k}", f"NDCG@{k}"]
    return [*names, "MRR"]


def _metric_sums(ranks: npt.ArrayLike, ks: Sequence[int]) -> npt.NDArray[np.float64]:
    """Per-metric sums over examples, in `_metric_names(ks)` order (sums all-reduce exactly)."""
    r = np.asarray(ranks, dtype=np.float64).reshape(-1)  # [N]
    gain = 1.0 / np.log2(r + 2.0)  # [N]
    sums = []
    for k in ks:
        hit = r < k  # [N]
        sums += [float(hit.sum()), float(gain[hit].sum())]
    sums.append(float((1.0 / (r + 1.0)).sum()))
    return np.array(sums, dtype=np.float64)


def metrics_from_ranks(
    ranks: npt.ArrayLike, ks: Sequence[int] = (5, 10, 20, 50)
) -> dict[str, float]:
    """HR@K, NDCG@K for each K, and MRR, from 0-based ranks [N] (NaN when N is 0)."""
    n = np.asarray(ranks).size
    sums = _metric_sums(ranks, ks)
    values = sums / n if n else np.full_like(sums, math.nan)
    return dict(zip(_metric_names(ks), values.tolist(), strict=True))


# --- shared helpers ------------------------------------------------------------------------


def select_examples(num_examples: int, max_users: int | None, seed: int) -> IntArray:
    """Sorted positions of the examples to evaluate: all, or a seeded subset of `max_users`."""
    if max_users is None or max_users >= num_examples:
        return np.arange(num_examples, dtype=np.int64)
    rng = np.random.default_rng([seed, _SUBSET_STREAM])
    return np.sort(rng.choice(num_examples, size=max_users, replace=False)).astype(np.int64)


def _take(examples: EvalExamples, rows: IntArray) -> EvalExamples:
    return EvalExamples(
        users=np.asarray(examples.users, dtype=np.int64)[rows],
        starts=np.asarray(examples.starts, dtype=np.int64)[rows],
        ends=np.asarray(examples.ends, dtype=np.int64)[rows],
        targets=np.asarray(examples.targets)[rows],
    )


def _num_items(model: SequentialEncoder) -> int:
    """Catalogue size: `model.item_embedding.num_items`, else `model.config.num_items`."""
    n: Any = getattr(getattr(model, "item_embedding", None), "num_items", None)
    if n is None:
        n = getattr(getattr(model, "config", None), "num_items", None)
    if not _is_int(n) or int(n) < 1:
        raise ConfigError("the model exposes no item count (item_embedding.num_items)")
    return int(n)


def _check_targets(targets: npt.NDArray[np.integer[Any]], num_items: int) -> None:
    if len(targets) and (int(targets.min()) < 1 or int(targets.max()) > num_items):
        raise DatasetError(
            f"evaluation targets must be item ids in 1..{num_items} (the model's catalogue), "
            f"got {int(targets.min())}..{int(targets.max())}"
        )


def _gather_ranges(
    values: npt.NDArray[Any], starts: IntArray, ends: IntArray
) -> tuple[IntArray, IntArray]:
    """(row, value) for every event of every row's range values[starts[i]:ends[i]], [P] each."""
    lengths = ends - starts  # [B]
    rows = np.repeat(np.arange(len(starts), dtype=np.int64), lengths)  # [P]
    first = np.cumsum(lengths) - lengths  # [B] position of each row's first pair
    index = np.arange(len(rows), dtype=np.int64) - first[rows] + starts[rows]  # [P]
    return rows, np.asarray(values[index], dtype=np.int64)


def _distinct(keys: IntArray) -> IntArray:
    """Sorted distinct values (np.unique, without its slow hash path for large int arrays)."""
    keys = np.sort(keys)
    if len(keys) < 2:
        return keys
    keep = np.empty(len(keys), dtype=bool)
    keep[0] = True
    np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    return keys[keep]


def _count_at_least(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """#(scores[b, j] >= threshold[b]) per row: [B, C], [B, 1] -> [B] int64.

    On CPU numpy counts several times faster than torch's reduction over a boolean tensor.
    """
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        mask = scores.numpy() >= threshold.numpy()  # [B, C]
        return torch.from_numpy(np.count_nonzero(mask, axis=1).astype(np.int64))
    return (scores >= threshold).sum(dim=1)


@contextmanager
def _inference(model: SequentialEncoder) -> Iterator[None]:
    """Eval mode and no autograd, restoring the model's train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _encode(
    model: SequentialEncoder,
    source: Sequences,
    starts: IntArray,
    ends: IntArray,
    config: EvalConfig,
    device: torch.device,
) -> torch.Tensor:
    """User vectors [B, D] from the last `max_length` history items (left-padded).

    Each call to the model is only as wide as its longest history: recloop models count
    positions from the most recent item, so extra all-padding columns would change nothing but
    the cost. Histories are therefore encoded in groups of similar length (sorted, then cut
    into ENCODE_GROUP rows): on short-sequence data a batch padded to its one long history
    would cost several times the real positions.
    """
    lengths = np.minimum(ends - starts, config.max_length)  # [B]
    order = np.argsort(lengths, kind="stable")  # [B]
    parts: list[torch.Tensor] = []
    for g0 in range(0, len(order), ENCODE_GROUP):
        rows = order[g0 : g0 + ENCODE_GROUP]
        width = int(np.max(lengths[rows], initial=1))  # >= 1: an empty history is one pad
        ids = last_items(source.items, starts[rows], ends[rows], width).astype(np.int64)
        input_ids = torch.from_numpy(ids).to(device)  # [G, W]
        timestamps = None
        if config.use_timestamps:
            ts = last_items(source.timestamps, starts[rows], ends[rows], width)  # [G, W]
            timestamps = torch.from_numpy(ts.astype(np.int64, copy=False)).to(device)
        parts.append(model.encode(input_ids, timestamps))  # [G, D]
    inverse = torch.from_numpy(np.argsort(order, kind="stable")).to(device)  # [B]
    return torch.cat(parts)[inverse]  # [B, D] in the callers' order (B >= 1)


# --- full ranking --------------------------------------------------------------------------


class FullRanks(NamedTuple):
    masked: IntArray  # [N] rank among all items except the history items (target kept)
    unmasked: IntArray  # [N] rank among all items


def _history_pairs(
    source: Sequences, starts: IntArray, ends: IntArray, targets: IntArray, num_items: int
) -> tuple[IntArray, IntArray]:
    """Distinct (row, item) pairs of each row's history, minus the row's target, by item."""
    rows, items = _gather_ranges(source.items, starts, ends)  # [P], [P]
    if len(items) and (int(items.min()) < 1 or int(items.max()) > num_items):
        raise DatasetError(f"history items must be item ids in 1..{num_items}")
    keep = items != targets[rows]  # the target is never masked
    stride = num_items + 1
    keys = _distinct(rows[keep] * stride + items[keep])  # [P'] distinct pairs
    rows, items = keys // stride, keys % stride
    order = np.argsort(items, kind="stable")
    return rows[order], items[order]


def ranks_full(
    model: SequentialEncoder,
    examples: EvalExamples,
    source: Sequences,
    config: EvalConfig,
    *,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> FullRanks:
    """Full-ranking ranks of every example's target, history-masked and unmasked.

    Rank = #items scoring strictly above the target + #other items scoring equal to it
    (pessimistic ties), over items 1..num_items. Masked: the user's history items
    ``source.items[start:end]`` are excluded, except the target itself, which is never masked
    even if it is in the history. Users go in batches of ``config.user_batch_size`` and items
    in chunks of ``config.item_chunk_size``; peak memory is about one [B, C] score matrix.
    Scores come from ``model.score(user_vectors, ids)`` with 1-D ids: for the chunk, and for
    the batch's targets (whose diagonal gives the target scores, through the same matmul path).
    The model is put in eval mode for the call and restored afterwards.
    """
    dev = torch.device(device)
    num_items = _num_items(model)
    targets_all = np.asarray(examples.targets, dtype=np.int64)  # [N]
    _check_targets(targets_all, num_items)
    starts_all = np.asarray(examples.starts, dtype=np.int64)  # [N]
    ends_all = np.asarray(examples.ends, dtype=np.int64)  # [N]
    n = len(targets_all)
    masked = np.empty(n, dtype=np.int64)
    unmasked = np.empty(n, dtype=np.int64)
    chunk = config.item_chunk_size
    edges = np.arange(1, num_items + 1 + chunk, chunk, dtype=np.int64)  # chunk c: [e_c, e_c+1)
    edges[-1] = min(int(edges[-1]), num_items + 1)
    with _inference(model):
        for b0 in range(0, n, config.user_batch_size):
            b1 = min(b0 + config.user_batch_size, n)
            starts, ends, targets = starts_all[b0:b1], ends_all[b0:b1], targets_all[b0:b1]
            user = _encode(model, source, starts, ends, config, dev)  # [B, D]
            target_ids = torch.from_numpy(targets).to(dev)  # [B]
            target_scores = model.score(user, target_ids).diagonal()  # [B]
            if bool(torch.isnan(target_scores).any()):
                raise FloatingPointError("the model scored an evaluation target as NaN")
            threshold = target_scores.unsqueeze(1)  # [B, 1]
            hist_rows_np, hist_items_np = _history_pairs(
                source, starts, ends, targets, num_items
            )  # [P], [P] sorted by item
            bounds = np.searchsorted(hist_items_np, edges)  # [num_chunks + 1]
            hist_rows = torch.from_numpy(hist_rows_np).to(dev)  # [P]
            hist_items = torch.from_numpy(hist_items_np).to(dev)  # [P]
            at_least = torch.zeros(b1 - b0, dtype=torch.int64, device=dev)  # [B]
            in_history = torch.zeros(b1 - b0, dtype=torch.int64, device=dev)  # [B]
            for c in range(len(edges) - 1):
                c0, c1 = int(edges[c]), int(edges[c + 1])
                ids = torch.arange(c0, c1, dtype=torch.int64, device=dev)  # [C]
                scores = model.score(user, ids)  # [B, C]
                at_least += _count_at_least(scores, threshold).to(dev)
                # The target's own column is not a competitor.
                own = ((target_ids >= c0) & (target_ids < c1)).nonzero().squeeze(1)  # [B']
                if len(own):
                    own_scores = scores[own, target_ids[own] - c0]  # [B']
                    at_least[own] -= (own_scores >= target_scores[own]).long()
                lo, hi = int(bounds[c]), int(bounds[c + 1])
                if hi > lo:  # history items of this chunk, scored by this same matmul
                    rows = hist_rows[lo:hi]  # [P_c]
                    hist_scores = scores[rows, hist_items[lo:hi] - c0]  # [P_c]
                    counted = (hist_scores >= target_scores[rows]).long()  # [P_c]
                    in_history.index_add_(0, rows, counted)
            unmasked[b0:b1] = at_least.cpu().numpy()
            masked[b0:b1] = (at_least - in_history).cpu().numpy()
            if progress is not None:
                progress(b1 - b0)
    return FullRanks(masked=masked, unmasked=unmasked)


# --- sampled-100 ---------------------------------------------------------------------------


def sample_negatives(
    users: npt.ArrayLike,
    source: Sequences,
    num_items: int,
    num_negatives: int = 100,
    *,
    seed: int = 0,
    example_ids: npt.ArrayLike | None = None,
) -> IntArray:
    """Negatives [N, num_negatives] for each example's user, uniform over 1..num_items.

    Drawn with replacement (as the SASRec paper's code does) and with rejection of every item
    in the user's whole sequence in ``source``. ``example_ids`` [N] (default 0..N-1) are the
    examples' positions in the full evaluation set: row i's negatives depend only on
    (seed, example_ids[i], the user's items), through one Generator per block of
    ``SAMPLE_BLOCK`` positions that draws a full [SAMPLE_BLOCK, K] matrix per rejection round.
    """
    users_a = np.asarray(users, dtype=np.int64).reshape(-1)  # [N]
    ids = _example_positions(example_ids, len(users_a), "users")  # [N]
    out = np.empty((len(users_a), num_negatives), dtype=np.int64)
    for rows in _block_groups(ids):
        block = int(ids[rows[0]]) // SAMPLE_BLOCK
        out[rows] = _sample_block(
            source, users_a[rows], ids[rows] % SAMPLE_BLOCK, num_items, num_negatives, seed, block
        )
    return out


def _example_positions(example_ids: npt.ArrayLike | None, n: int, what: str) -> IntArray:
    """Positions of n examples in the full evaluation set (0..n-1 when not given)."""
    if example_ids is None:
        return np.arange(n, dtype=np.int64)
    ids = np.asarray(example_ids, dtype=np.int64).reshape(-1)
    if len(ids) != n:
        raise ValueError(f"example_ids has {len(ids)} rows but {what} has {n}")
    return ids


def _block_groups(ids: IntArray) -> list[IntArray]:
    """Row indices grouped by sampling block (ids // SAMPLE_BLOCK), blocks in ascending order."""
    blocks = ids // SAMPLE_BLOCK  # [N]
    order = np.argsort(blocks, kind="stable")
    _, first = np.unique(blocks[order], return_index=True)
    bounds = [*first.tolist(), len(ids)]
    return [order[bounds[j] : bounds[j + 1]] for j in range(len(first))]


def _sample_block(
    source: Sequences,
    users: IntArray,
    slots: IntArray,
    num_items: int,
    num_negatives: int,
    seed: int,
    block: int,
) -> IntArray:
    """Negatives [n, K] of the rows at `slots` (positions within the block) of one block."""
    offsets = np.asarray(source.offsets, dtype=np.int64)
    rows, items = _gather_ranges(source.items, offsets[users], offsets[users + 1])  # [P]
    stride = num_items + 1
    seen = _distinct(rows * stride + items)  # [P'] sorted (row, item) keys of interactions
    distinct = np.bincount(seen // stride, minlength=len(users))  # [n]
    if len(users) and int(distinct.max()) >= num_items:
        user = int(users[int(np.argmax(distinct))])
        raise DatasetError(f"user {user} interacted with every item: no negatives to sample")
    rng = np.random.default_rng([seed, _NEGATIVES_STREAM, block])
    result = np.zeros((len(users), num_negatives), dtype=np.int64)  # [n, K]
    pending_rows = np.repeat(np.arange(len(users), dtype=np.int64), num_negatives)  # [M]
    pending_cols = np.tile(np.arange(num_negatives, dtype=np.int64), len(users))  # [M]
    while len(pending_rows):
        draws = rng.integers(1, num_items + 1, size=(SAMPLE_BLOCK, num_negatives))  # full block
        candidate = draws[slots[pending_rows], pending_cols]  # [M]
        keys = pending_rows * stride + candidate  # [M]
        found = np.searchsorted(seen, keys)  # [M]
        rejected = np.zeros(len(keys), dtype=bool)
        inside = found < len(seen)
        rejected[inside] = seen[found[inside]] == keys[inside]
        ok = ~rejected
        result[pending_rows[ok], pending_cols[ok]] = candidate[ok]
        pending_rows, pending_cols = pending_rows[rejected], pending_cols[rejected]
    return result


def ranks_sampled(
    model: SequentialEncoder,
    examples: EvalExamples,
    source: Sequences,
    config: EvalConfig,
    *,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    example_ids: npt.ArrayLike | None = None,
) -> IntArray:
    """Sampled-protocol ranks [N]: #negatives scoring >= the target (pessimistic ties).

    Each target competes with ``config.num_negatives`` items from :func:`sample_negatives`
    (duplicates count once per draw). Scores come from ``model.score(user_vectors, ids)`` with
    per-row ids [B, 1 + K], target first, so target and negatives share one computation.
    ``example_ids``: the examples' positions in the full evaluation set, which key the draws.
    """
    dev = torch.device(device)
    num_items = _num_items(model)
    targets_all = np.asarray(examples.targets, dtype=np.int64)  # [N]
    _check_targets(targets_all, num_items)
    users_all = np.asarray(examples.users, dtype=np.int64)  # [N]
    starts_all = np.asarray(examples.starts, dtype=np.int64)  # [N]
    ends_all = np.asarray(examples.ends, dtype=np.int64)  # [N]
    ids = _example_positions(example_ids, len(targets_all), "examples")  # [N]
    ranks = np.empty(len(targets_all), dtype=np.int64)
    # One sampling pass per block of example positions, then user batches within it.
    with _inference(model):
        for group in _block_groups(ids):  # [n_b]
            negatives = sample_negatives(
                users_all[group],
                source,
                num_items,
                config.num_negatives,
                seed=config.seed,
                example_ids=ids[group],
            )  # [n_b, K]
            for g0 in range(0, len(group), config.user_batch_size):
                rows = group[g0 : g0 + config.user_batch_size]  # [B]
                user = _encode(model, source, starts_all[rows], ends_all[rows], config, dev)
                candidates = np.concatenate(
                    [targets_all[rows, None], negatives[g0 : g0 + len(rows)]], axis=1
                )  # [B, 1 + K]
                scores = model.score(user, torch.from_numpy(candidates).to(dev))  # [B, 1 + K]
                if bool(torch.isnan(scores[:, 0]).any()):
                    raise FloatingPointError("the model scored an evaluation target as NaN")
                ranks[rows] = (scores[:, 1:] >= scores[:, :1]).sum(dim=1).cpu().numpy()
                if progress is not None:
                    progress(len(rows))
    return ranks


# --- entry point ---------------------------------------------------------------------------


def evaluate(
    model: SequentialEncoder,
    examples: EvalExamples,
    source: Sequences,
    config: EvalConfig,
    *,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Metrics of `model` on `examples` under `config.protocol` (see the module docstring).

    Full ranking returns ``HR@K``, ``NDCG@K`` (K in ``config.ks``) and ``MRR`` with history
    masking, the same under ``unmasked/``, plus ``users`` (examples evaluated, one per user
    under leave-one-out), ``protocol`` and ``max_users`` (None = all). Sampled-100 returns
    the masked-name metrics only, plus ``num_negatives``. Metric values are floats (NaN when
    nothing was evaluated).

    Distributed: rank ``rank`` of ``world_size`` evaluates the strided shard
    ``selected[rank::world_size]`` of the selected examples. When torch.distributed is
    initialised and ``world_size > 1`` the metric sums and counts are all-reduced (on
    ``device``, so it suits gloo on CPU and NCCL on CUDA), and every rank returns the global
    metrics; otherwise the result covers this rank's shard only. The model must already be on
    ``device``.
    """
    if not _is_int(world_size) or world_size < 1:
        raise ConfigError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    selected = select_examples(len(examples), config.max_users, config.seed)  # [N']
    shard = selected[rank::world_size]  # [N' / world_size]
    local = _take(examples, shard)
    names = _metric_names(config.ks)
    if config.protocol == "full":
        full = ranks_full(model, local, source, config, device=device, progress=progress)
        names = names + [f"unmasked/{name}" for name in names]
        sums = np.concatenate(
            [_metric_sums(full.masked, config.ks), _metric_sums(full.unmasked, config.ks)]
        )
    else:
        sampled = ranks_sampled(
            model, local, source, config, device=device, progress=progress, example_ids=shard
        )
        sums = _metric_sums(sampled, config.ks)
    totals = torch.tensor([float(len(shard)), *sums.tolist()], dtype=torch.float64)
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        totals = totals.to(torch.device(device))
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    values = totals.cpu().tolist()
    count = round(values[0])
    result: dict[str, Any] = {
        name: (value / count if count else math.nan)
        for name, value in zip(names, values[1:], strict=True)
    }
    result["users"] = count
    result["protocol"] = config.protocol
    result["max_users"] = config.max_users
    if config.protocol == "sampled100":
        result["num_negatives"] = config.num_negatives
    return result
