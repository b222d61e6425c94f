"""The sampled-100 protocol: each target ranked against seeded random negatives, drawn per
block of example positions so the draws depend on neither the batch size nor the sharding."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch

from recloop.data.sequences import Sequences
from recloop.data.splits import EvalExamples
from recloop.errors import DatasetError
from recloop.evaluate.common import (
    IntArray,
    Progress,
    catalogue_size,
    check_targets,
    distinct_sorted,
    encode_histories,
    gather_ranges,
    inference,
)
from recloop.models.base import SequentialEncoder

if TYPE_CHECKING:
    from recloop.evaluate import EvalConfig

# Negatives are drawn per block of this many example positions, one Generator per block: a
# fixed block keeps the draws independent of user_batch_size and of the distributed sharding.
SAMPLE_BLOCK = 4096
# The stream of the seeded Generators that draw negatives (the subset uses another one).
NEGATIVES_STREAM = 2


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
    rows, items = gather_ranges(source.items, offsets[users], offsets[users + 1])  # [P]
    stride = num_items + 1
    seen = distinct_sorted(rows * stride + items)  # [P'] sorted (row, item) keys of interactions
    distinct = np.bincount(seen // stride, minlength=len(users))  # [n]
    if len(users) and int(distinct.max()) >= num_items:
        user = int(users[int(np.argmax(distinct))])
        raise DatasetError(f"user {user} interacted with every item: no negatives to sample")
    rng = np.random.default_rng([seed, NEGATIVES_STREAM, block])
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
    num_items = catalogue_size(model)
    targets_all = np.asarray(examples.targets, dtype=np.int64)  # [N]
    check_targets(targets_all, num_items)
    users_all = np.asarray(examples.users, dtype=np.int64)  # [N]
    starts_all = np.asarray(examples.starts, dtype=np.int64)  # [N]
    ends_all = np.asarray(examples.ends, dtype=np.int64)  # [N]
    ids = _example_positions(example_ids, len(targets_all), "examples")  # [N]
    ranks = np.empty(len(targets_all), dtype=np.int64)
    # One sampling pass per block of example positions, then user batches within it.
    with inference(model):
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
                user = encode_histories(
                    model, source, starts_all[rows], ends_all[rows], config, dev
                )
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
