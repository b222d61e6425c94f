"""The item embedding table shared by the input layer and the output (scoring) layer."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recloop.data.sequences import PADDING_ID


class ItemEmbedding(nn.Module):
    """[num_items + 1, D] table; row 0 is padding (zero, never trained, scored -inf).

    normalize=True L2-normalises both the table rows and the user vectors before the dot
    product, and divides by `temperature`: logits are cosine similarities / temperature, which
    keeps sampled-softmax training stable with large catalogues (HSTU, gSASRec use this).
    """

    def __init__(
        self,
        num_items: int,
        dim: int,
        *,
        normalize: bool = False,
        temperature: float = 1.0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.num_items = num_items
        self.dim = dim
        self.normalize = normalize
        self.temperature = temperature
        self.weight = nn.Parameter(torch.empty(num_items + 1, dim))
        nn.init.normal_(self.weight, std=init_std)
        with torch.no_grad():
            self.weight[PADDING_ID].zero_()

    @classmethod
    def for_model(cls, config: Any) -> ItemEmbedding:
        """The table a model config asks for (its num_items, dim, normalize_embeddings,
        temperature and init_std fields, which every recloop model config has)."""
        return cls(
            config.num_items,
            config.dim,
            normalize=config.normalize_embeddings,
            temperature=config.temperature,
            init_std=config.init_std,
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings [..., D] (raw rows; the model scales/normalises as it needs)."""
        return F.embedding(ids, self.weight, padding_idx=PADDING_ID)

    def output_table(self) -> torch.Tensor:
        """[num_items + 1, D], normalised when `normalize`."""
        return F.normalize(self.weight, dim=-1) if self.normalize else self.weight

    def output_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight)
        return F.normalize(rows, dim=-1) if self.normalize else rows

    def prepare_query(self, user_vectors: torch.Tensor) -> torch.Tensor:
        """User vectors as they enter the dot product (normalised, temperature applied)."""
        if self.normalize:
            user_vectors = F.normalize(user_vectors, dim=-1)
        return user_vectors / self.temperature

    def logits(
        self, user_vectors: torch.Tensor, item_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        query = self.prepare_query(user_vectors)  # [..., D]
        if item_ids is None:
            scores = query @ self.output_table().T  # [..., I + 1]
            scores[..., PADDING_ID] = float("-inf")
            return scores
        candidates = self.output_vectors(item_ids)
        if item_ids.dim() == 1:  # shared candidates [N, D]
            return query @ candidates.T  # [..., N]
        return (query.unsqueeze(-2) * candidates).sum(-1)  # [..., N]
