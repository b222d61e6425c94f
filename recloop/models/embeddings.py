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
        weight: nn.Parameter | None = None,
    ) -> None:
        """`weight` adopts an existing [num_items + 1, D] table instead of a new random one."""
        super().__init__()
        self.num_items = num_items
        self.dim = dim
        self.normalize = normalize
        self.temperature = temperature
        if weight is not None:
            self.weight = weight
            return
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

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Item rows [..., D] of `ids` (row 0, padding, is zero and gets no gradient)."""
        return F.embedding(ids, self.weight, padding_idx=PADDING_ID)

    def table(self) -> torch.Tensor:
        """All item rows [num_items + 1, D]."""
        return self.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings [..., D] (raw rows; the model scales/normalises as it needs)."""
        return self.rows(ids)

    def output_table(self) -> torch.Tensor:
        """[num_items + 1, D], normalised when `normalize`."""
        table = self.table()
        return F.normalize(table, dim=-1) if self.normalize else table

    def output_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.rows(ids)
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


class AttributeItemEmbedding(ItemEmbedding):
    """An item table whose row i is a free row plus the mean of the rows of item i's attributes.

    Items that share a brand or a category share part of their row, so an item seen a few times
    borrows from the items it resembles (side-information fusion at the embedding, as in FDSA
    or SASRecF). ``attribute_ids`` [num_items + 1, A] lists each item's attribute ids (1-based,
    0 = none); it comes from the dataset, so it is a non-persistent buffer. `fold` returns the
    equivalent plain `ItemEmbedding`, which is what a published version stores.
    """

    attribute_ids: torch.Tensor

    def __init__(self, base: ItemEmbedding, attribute_ids: torch.Tensor, init_std: float) -> None:
        if attribute_ids.dim() != 2 or attribute_ids.shape[0] != base.num_items + 1:
            raise ValueError(
                f"attribute_ids must be [{base.num_items + 1}, A], got {list(attribute_ids.shape)}"
            )
        if bool((attribute_ids[PADDING_ID] != 0).any()):
            raise ValueError("the padding item (row 0) must have no attributes")
        super().__init__(  # the free rows are the base table's, and keep training from there
            base.num_items,
            base.dim,
            normalize=base.normalize,
            temperature=base.temperature,
            weight=base.weight,
        )
        num_attributes = int(attribute_ids.max())
        self.attribute_weight = nn.Parameter(
            torch.empty(num_attributes + 1, base.dim, device=base.weight.device)
        )
        nn.init.normal_(self.attribute_weight, std=init_std)
        with torch.no_grad():
            self.attribute_weight[0].zero_()
        self.register_buffer(
            "attribute_ids", attribute_ids.to(base.weight.device, torch.long), persistent=False
        )

    def _attribute_rows(self, attribute_ids: torch.Tensor) -> torch.Tensor:
        """[N, A] attribute ids -> [N, D], the mean of each row's non-zero ones (0 when none)."""
        return F.embedding_bag(
            attribute_ids, self.attribute_weight, mode="mean", padding_idx=PADDING_ID
        )

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        fused = super().rows(flat) + self._attribute_rows(self.attribute_ids[flat])
        return fused.reshape(*ids.shape, self.dim)

    def table(self) -> torch.Tensor:
        return self.weight + self._attribute_rows(self.attribute_ids)

    def fold(self) -> ItemEmbedding:
        """The plain table with the same rows (no attribute parameters)."""
        with torch.no_grad():
            rows = nn.Parameter(self.table().clone())
        return ItemEmbedding(
            self.num_items,
            self.dim,
            normalize=self.normalize,
            temperature=self.temperature,
            weight=rows,
        )


def with_item_attributes(model: nn.Module, attribute_ids: torch.Tensor, init_std: float) -> None:
    """Replaces `model.item_embedding` by an `AttributeItemEmbedding` over the same free rows."""
    base = model.item_embedding
    if not isinstance(base, ItemEmbedding):
        raise TypeError(f"{type(model).__name__} has no ItemEmbedding to give attributes to")
    model.item_embedding = AttributeItemEmbedding(base, attribute_ids, init_std)


def folded_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with an attribute item table folded into a plain one: the weights
    of the same architecture without attributes, which score exactly like `model`."""
    state = model.state_dict()
    embedding = getattr(model, "item_embedding", None)
    if isinstance(embedding, AttributeItemEmbedding):
        for name in list(state):
            if name.startswith("item_embedding."):
                del state[name]
        for name, tensor in embedding.fold().state_dict().items():
            state[f"item_embedding.{name}"] = tensor
    return state
