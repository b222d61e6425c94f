"""Where the online learner's user sequences start (the training dataset's, when it is still
there), and the padded windows an online step trains on."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from recloop.data.history import UserHistory
from recloop.data.vocabulary import Vocabulary
from recloop.registry import Manifest

log = logging.getLogger("recloop.online")


def base_history(
    data: Path | None, origin_manifest: Manifest, vocabulary: Vocabulary
) -> UserHistory | None:
    """`data`, or the dataset the origin version was trained on when it is still there."""
    if data is None:
        recorded = (origin_manifest.dataset or {}).get("path")
        data = Path(recorded) if recorded and Path(recorded).is_dir() else None
    if data is None:
        log.warning("no training dataset: sequences start from the event log alone")
        return None
    return UserHistory.open(data, vocabulary)


def padded_chunks(
    windows: Sequence[Sequence[int]],
    max_tokens: int,
    last_only: bool = False,
    target_counts: Sequence[int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs [B, W], targets [B, W]) left-padded chunks of length-sorted `windows`, each
    chunk at most `max_tokens` padded positions (and at least one window). With `last_only`,
    targets are [B, 1]: each window's last item, the target of its last position only.

    `target_counts[i]` (default: all) is how many of window i's last positions have a target;
    the others are context only (target 0): the encoder reads them, the loss skips them."""
    start = 0
    while start < len(windows):
        end = start + 1
        while end < len(windows) and (end + 1 - start) * (len(windows[end]) - 1) <= max_tokens:
            end += 1
        chunk = windows[start:end]
        width = len(chunk[-1]) - 1  # the longest: windows are sorted by length
        # Filled in numpy (a slice assignment from a list per row) and handed to torch without
        # a copy: a torch.tensor() per row cost 5% of an online step.
        inputs = np.zeros((len(chunk), width), dtype=np.int64)
        targets = np.zeros((len(chunk), 1 if last_only else width), dtype=np.int64)
        for row, window in enumerate(chunk):
            n = len(window) - 1
            inputs[row, width - n :] = window[:-1]
            if last_only:
                targets[row, 0] = window[-1]
                continue
            count = n if target_counts is None else min(n, target_counts[start + row])
            if count > 0:
                targets[row, width - count :] = window[len(window) - count :]
        yield torch.from_numpy(inputs), torch.from_numpy(targets)
        start = end
