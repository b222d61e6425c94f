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

Here: the config, the metrics and the entry point; ``full.py`` and ``sampled.py`` hold the two
protocols' ranks, ``common.py`` what they share (encoding histories, gathering ranges).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist

from recloop.data.sequences import Sequences
from recloop.data.splits import EvalExamples
from recloop.errors import ConfigError
from recloop.evaluate.common import ENCODE_GROUP, IntArray, Progress, is_int, take
from recloop.evaluate.full import FullRanks, ranks_full
from recloop.evaluate.sampled import ranks_sampled, sample_negatives
from recloop.models.base import SequentialEncoder

__all__ = [
    "ENCODE_GROUP",
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
# The stream of the seeded Generator that picks the subset (the negatives use another one).
_SUBSET_STREAM = 1


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
            if not is_int(value) or value < 1:
                raise ConfigError(f"eval.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.ks, tuple) or not self.ks:
            raise ConfigError(f"eval.ks must be a non-empty tuple of integers, got {self.ks!r}")
        for k in self.ks:
            if not is_int(k) or k < 1:
                raise ConfigError(f"eval.ks must hold integers >= 1, got {k!r}")
        if len(set(self.ks)) != len(self.ks):
            raise ConfigError(f"eval.ks has duplicates: {self.ks!r}")
        if self.protocol not in ("full", "sampled100"):
            raise ConfigError(
                f"eval.protocol must be 'full' or 'sampled100', got {self.protocol!r}"
            )
        if self.max_users is not None and (not is_int(self.max_users) or self.max_users < 1):
            raise ConfigError(
                f"eval.max_users must be an integer >= 1 or absent, got {self.max_users!r}"
            )
        if not is_int(self.seed) or self.seed < 0:
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


def select_examples(num_examples: int, max_users: int | None, seed: int) -> IntArray:
    """Sorted positions of the examples to evaluate: all, or a seeded subset of `max_users`."""
    if max_users is None or max_users >= num_examples:
        return np.arange(num_examples, dtype=np.int64)
    rng = np.random.default_rng([seed, _SUBSET_STREAM])
    return np.sort(rng.choice(num_examples, size=max_users, replace=False)).astype(np.int64)


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
    if not is_int(world_size) or world_size < 1:
        raise ConfigError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not is_int(rank) or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    selected = select_examples(len(examples), config.max_users, config.seed)  # [N']
    shard = selected[rank::world_size]  # [N' / world_size]
    local = take(examples, shard)
    names, sums = _rank_sums(model, local, source, config, device, progress, shard)
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


def _rank_sums(
    model: SequentialEncoder,
    examples: EvalExamples,
    source: Sequences,
    config: EvalConfig,
    device: str | torch.device,
    progress: Progress | None,
    example_ids: IntArray,
) -> tuple[list[str], npt.NDArray[np.float64]]:
    """The metric names and their sums over `examples` under `config.protocol` (full ranking:
    the masked metrics, then the same under ``unmasked/``)."""
    names = _metric_names(config.ks)
    if config.protocol == "full":
        full = ranks_full(model, examples, source, config, device=device, progress=progress)
        names = names + [f"unmasked/{name}" for name in names]
        sums = np.concatenate(
            [_metric_sums(full.masked, config.ks), _metric_sums(full.unmasked, config.ks)]
        )
        return names, sums
    sampled = ranks_sampled(
        model, examples, source, config, device=device, progress=progress, example_ids=example_ids
    )
    return names, _metric_sums(sampled, config.ks)
