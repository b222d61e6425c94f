"""What both protocols share: histories encoded as user vectors, the catalogue's size, ranges
gathered from the CSR arrays, and counting the items that score at least as high."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from recloop.data.batches import last_items
from recloop.data.sequences import Sequences
from recloop.data.splits import EvalExamples
from recloop.errors import ConfigError, DatasetError
from recloop.models.base import SequentialEncoder

if TYPE_CHECKING:
    from recloop.evaluate import EvalConfig

Progress = Callable[[int], None]
IntArray = npt.NDArray[np.int64]

# Histories encoded per model call, grouped by length (see encode_histories).
ENCODE_GROUP = 128


def is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def take(examples: EvalExamples, rows: IntArray) -> EvalExamples:
    return EvalExamples(
        users=np.asarray(examples.users, dtype=np.int64)[rows],
        starts=np.asarray(examples.starts, dtype=np.int64)[rows],
        ends=np.asarray(examples.ends, dtype=np.int64)[rows],
        targets=np.asarray(examples.targets)[rows],
    )


def catalogue_size(model: SequentialEncoder) -> int:
    """Catalogue size: `model.item_embedding.num_items`, else `model.config.num_items`."""
    n: Any = getattr(getattr(model, "item_embedding", None), "num_items", None)
    if n is None:
        n = getattr(getattr(model, "config", None), "num_items", None)
    if not is_int(n) or int(n) < 1:
        raise ConfigError("the model exposes no item count (item_embedding.num_items)")
    return int(n)


def check_targets(targets: npt.NDArray[np.integer[Any]], num_items: int) -> None:
    if len(targets) and (int(targets.min()) < 1 or int(targets.max()) > num_items):
        raise DatasetError(
            f"evaluation targets must be item ids in 1..{num_items} (the model's catalogue), "
            f"got {int(targets.min())}..{int(targets.max())}"
        )


def gather_ranges(
    values: npt.NDArray[Any], starts: IntArray, ends: IntArray
) -> tuple[IntArray, IntArray]:
    """(row, value) for every event of every row's range values[starts[i]:ends[i]], [P] each."""
    lengths = ends - starts  # [B]
    rows = np.repeat(np.arange(len(starts), dtype=np.int64), lengths)  # [P]
    first = np.cumsum(lengths) - lengths  # [B] position of each row's first pair
    index = np.arange(len(rows), dtype=np.int64) - first[rows] + starts[rows]  # [P]
    return rows, np.asarray(values[index], dtype=np.int64)


def distinct_sorted(keys: IntArray) -> IntArray:
    """Sorted distinct values (np.unique, without its slow hash path for large int arrays)."""
    keys = np.sort(keys)
    if len(keys) < 2:
        return keys
    keep = np.empty(len(keys), dtype=bool)
    keep[0] = True
    np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    return keys[keep]


def count_at_least(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """#(scores[b, j] >= threshold[b]) per row: [B, C], [B, 1] -> [B] int64.

    On CPU numpy counts several times faster than torch's reduction over a boolean tensor.
    """
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        mask = scores.numpy() >= threshold.numpy()  # [B, C]
        return torch.from_numpy(np.count_nonzero(mask, axis=1).astype(np.int64))
    return (scores >= threshold).sum(dim=1)


@contextmanager
def inference(model: SequentialEncoder) -> Iterator[None]:
    """Eval mode and no autograd, restoring the model's train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def encode_histories(
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
