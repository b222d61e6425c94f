"""Users' sequences where the online learner starts them (the training dataset), and the
padded windows an online step trains on."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recloop.data.dataset import SequenceDataset
from recloop.online.items import OnlineVocabulary

log = logging.getLogger("recloop.online")


class BaseHistory:
    """Users' sequences from the training dataset (model dense ids), where sequences start."""

    def __init__(self, dataset: SequenceDataset | None, mapping: np.ndarray | None) -> None:
        self._dataset = dataset
        self._mapping = mapping
        self.users: list[str] = []
        self._index: dict[str, int] = {}
        if dataset is not None:
            self.users = [str(raw) for raw in dataset.users.raw_by_id.tolist()]
            self._index = {raw: i for i, raw in enumerate(self.users)}
            self._offsets = np.asarray(dataset.sequences.offsets, dtype=np.int64)
            self._items = np.asarray(dataset.sequences.items)

    @classmethod
    def open(
        cls, data: Path | None, origin_manifest: dict[str, Any], vocabulary: OnlineVocabulary
    ) -> BaseHistory:
        """`data`, or the dataset the origin version was trained on when it is still there."""
        if data is None:
            recorded = (origin_manifest.get("dataset") or {}).get("path")
            data = Path(recorded) if recorded and Path(recorded).is_dir() else None
        if data is None:
            log.warning("no training dataset: sequences start from the event log alone")
            return cls(None, None)
        dataset = SequenceDataset(data)
        raws = dataset.items.raw_by_id.tolist()
        mapping = np.array([0] + [vocabulary.dense(str(r)) for r in raws], dtype=np.int64)
        return cls(dataset, mapping)

    def items(self, user: str) -> list[int]:
        index = self._index.get(user)
        if index is None or self._mapping is None:
            return []
        rows = self._items[self._offsets[index] : self._offsets[index + 1]]
        mapped = self._mapping[rows]
        return [int(i) for i in mapped[mapped > 0]]


def padded_chunks(
    windows: Sequence[Sequence[int]], max_tokens: int, last_only: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs [B, W], targets [B, W]) left-padded chunks of length-sorted `windows`, each
    chunk at most `max_tokens` padded positions (and at least one window). With `last_only`,
    targets are [B, 1]: each window's last item, the target of its last position only."""
    start = 0
    while start < len(windows):
        end = start + 1
        while end < len(windows) and (end + 1 - start) * (len(windows[end]) - 1) <= max_tokens:
            end += 1
        chunk = windows[start:end]
        width = len(chunk[-1]) - 1  # the longest: windows are sorted by length
        inputs = torch.zeros((len(chunk), width), dtype=torch.long)
        targets = torch.zeros((len(chunk), 1 if last_only else width), dtype=torch.long)
        for row, window in enumerate(chunk):
            n = len(window) - 1
            inputs[row, width - n :] = torch.tensor(window[:-1])
            if last_only:
                targets[row, 0] = window[-1]
            else:
                targets[row, width - n :] = torch.tensor(window[1:])
        yield inputs, targets
        start = end
