"""The interface every sequential model implements, so training, evaluation, serving and
distillation share one code path.

Conventions: item ids are 1..num_items, 0 is padding; sequences are LEFT-padded, so the last
position ([:, -1]) is always the most recent item. Timestamps are int64 seconds (or source
order) aligned with the item ids; models that do not use time ignore them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from recloop.data.sequences import PADDING_ID
from recloop.errors import ConfigError


def window_layout(
    input_ids: torch.Tensor, max_length: int, model: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What every model needs of a left-padded window [B, L]: (valid [B, L] real items,
    keep [B, L, 1] the same as a multiplier, positions [L] counted from the most recent item,
    0 = most recent). A window longer than `max_length` is a ConfigError naming `model`."""
    length = input_ids.shape[1]
    if length > max_length:
        raise ConfigError(f"{model}: input length {length} exceeds max_length={max_length}")
    valid = input_ids != PADDING_ID  # [B, L]
    # (length - 1) - arange rather than a negative-step arange: the ONNX exporter mis-sizes
    # the latter under a dynamic length.
    positions = (length - 1) - torch.arange(length, device=input_ids.device)  # [L]
    return valid, valid.unsqueeze(-1), positions


class SequentialEncoder(nn.Module):
    """Base class. Subclasses set `self.config` and `self.item_embedding` and define `forward`."""

    config: Any
    item_embedding: Any  # recloop.models.embeddings.ItemEmbedding
    # True: the hidden state at position t depends only on positions <= t, so one window
    # trains every prefix at once. A non-causal model (BSARec) trains on each prefix as its
    # own sample, with the loss at the last position (train.samples = "prefixes").
    causal: bool = True

    def forward(
        self,
        input_ids: torch.Tensor,
        timestamps: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Hidden state at every position: [B, L] ids -> [B, L, D] (causal when `causal`).

        `last_only`: only the most recent position, [B, 1, D], equal to [:, -1:] of the full
        output; the last block then skips the other positions' work. Serving, evaluation and
        prefix training (one target per window, at the end) need nothing else.
        """
        raise NotImplementedError

    def encode(
        self, input_ids: torch.Tensor, timestamps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """User vector from the most recent position: [B, L] -> [B, D]."""
        return self.forward(input_ids, timestamps, last_only=True)[:, -1, :]

    def score(
        self, user_vectors: torch.Tensor, item_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of items for user vectors [..., D].

        item_ids None: every item, [..., num_items + 1] with the padding column at -inf.
        item_ids [..., N] (same leading dims as user_vectors): [..., N].
        item_ids [N] (1-D, shared candidates): [..., N].
        """
        logits: torch.Tensor = self.item_embedding.logits(user_vectors, item_ids)
        return logits
