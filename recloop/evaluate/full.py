"""Full-ranking ranks: every target against the whole catalogue, with and without the
user's history masked (see the package docstring for the definition of a rank)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from recloop.data.sequences import Sequences
from recloop.data.splits import EvalExamples
from recloop.errors import DatasetError
from recloop.evaluate.common import (
    IntArray,
    Progress,
    catalogue_size,
    check_targets,
    count_at_least,
    distinct_sorted,
    encode_histories,
    gather_ranges,
    inference,
)
from recloop.models.base import SequentialEncoder

if TYPE_CHECKING:
    from recloop.evaluate import EvalConfig


class FullRanks(NamedTuple):
    masked: IntArray  # [N] rank among all items except the history items (target kept)
    unmasked: IntArray  # [N] rank among all items


def _history_pairs(
    source: Sequences, starts: IntArray, ends: IntArray, targets: IntArray, num_items: int
) -> tuple[IntArray, IntArray]:
    """Distinct (row, item) pairs of each row's history, minus the row's target, by item."""
    rows, items = gather_ranges(source.items, starts, ends)  # [P], [P]
    if len(items) and (int(items.min()) < 1 or int(items.max()) > num_items):
        raise DatasetError(f"history items must be item ids in 1..{num_items}")
    keep = items != targets[rows]  # the target is never masked
    stride = num_items + 1
    keys = distinct_sorted(rows[keep] * stride + items[keep])  # [P'] distinct pairs
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
    num_items = catalogue_size(model)
    targets_all = np.asarray(examples.targets, dtype=np.int64)  # [N]
    check_targets(targets_all, num_items)
    starts_all = np.asarray(examples.starts, dtype=np.int64)  # [N]
    ends_all = np.asarray(examples.ends, dtype=np.int64)  # [N]
    n = len(targets_all)
    masked = np.empty(n, dtype=np.int64)
    unmasked = np.empty(n, dtype=np.int64)
    chunk = config.item_chunk_size
    edges = np.arange(1, num_items + 1 + chunk, chunk, dtype=np.int64)  # chunk c: [e_c, e_c+1)
    edges[-1] = min(int(edges[-1]), num_items + 1)
    with inference(model):
        for b0 in range(0, n, config.user_batch_size):
            b1 = min(b0 + config.user_batch_size, n)
            starts, ends, targets = starts_all[b0:b1], ends_all[b0:b1], targets_all[b0:b1]
            user = encode_histories(model, source, starts, ends, config, dev)  # [B, D]
            history = _history_pairs(source, starts, ends, targets, num_items)  # [P], [P]
            at_least, in_history = _rank_batch(model, user, targets, history, edges, dev)
            unmasked[b0:b1] = at_least.cpu().numpy()
            masked[b0:b1] = (at_least - in_history).cpu().numpy()
            if progress is not None:
                progress(b1 - b0)
    return FullRanks(masked=masked, unmasked=unmasked)


def _rank_batch(
    model: SequentialEncoder,
    user: torch.Tensor,
    targets: IntArray,
    history: tuple[IntArray, IntArray],
    edges: IntArray,
    dev: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For a batch of user vectors [B, D]: #items scoring at least as high as each target [B]
    (its own column excluded), and how many of those are history items [B], scoring the
    catalogue chunk by chunk (chunk c is ids [edges[c], edges[c + 1]))."""
    target_ids = torch.from_numpy(targets).to(dev)  # [B]
    target_scores = model.score(user, target_ids).diagonal()  # [B]
    if bool(torch.isnan(target_scores).any()):
        raise FloatingPointError("the model scored an evaluation target as NaN")
    threshold = target_scores.unsqueeze(1)  # [B, 1]
    hist_rows_np, hist_items_np = history  # [P], [P] sorted by item
    bounds = np.searchsorted(hist_items_np, edges)  # [num_chunks + 1]
    hist_rows = torch.from_numpy(hist_rows_np).to(dev)  # [P]
    hist_items = torch.from_numpy(hist_items_np).to(dev)  # [P]
    at_least = torch.zeros(len(targets), dtype=torch.int64, device=dev)  # [B]
    in_history = torch.zeros(len(targets), dtype=torch.int64, device=dev)  # [B]
    for c in range(len(edges) - 1):
        c0, c1 = int(edges[c]), int(edges[c + 1])
        ids = torch.arange(c0, c1, dtype=torch.int64, device=dev)  # [C]
        scores = model.score(user, ids)  # [B, C]
        at_least += count_at_least(scores, threshold).to(dev)
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
    return at_least, in_history
