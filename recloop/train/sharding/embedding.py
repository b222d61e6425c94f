"""The model's item embedding when its table is sharded: rows looked up once per step.

A model reads its item table through `ItemEmbedding.rows` (inputs, targets, negatives) and
`table` (the full softmax, full-ranking evaluation). With a sharded table those rows live on
other processes, and fetching them is a collective, so each step fetches every row it will
need in one lookup (:func:`bind_step`) before the forward pass; `rows` then gathers from
them locally, and their gradients flow back into the fused optimizer. Evaluation binds the
whole gathered table instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from recloop.config import TrainConfig
from recloop.data.sequences import PADDING_ID
from recloop.errors import ConfigError
from recloop.models.base import SequentialEncoder
from recloop.models.embeddings import ItemEmbedding
from recloop.train.losses import Negatives, draw_negatives
from recloop.train.sharding.table import ShardedItemTable


class LookupItemEmbedding(ItemEmbedding):
    """An `ItemEmbedding` without a weight of its own: its rows are the ones bound for the
    current step (sorted ids -> rows), or a whole bound table."""

    def __init__(self, num_items: int, dim: int, *, normalize: bool, temperature: float) -> None:
        nn.Module.__init__(self)  # no Parameter: the table is the sharded one
        self.num_items, self.dim = num_items, dim
        self.normalize, self.temperature = normalize, temperature
        self._ids: torch.Tensor | None = None  # [U] sorted, starting with the padding id
        self._rows: torch.Tensor | None = None  # [U, D]
        self._table: torch.Tensor | None = None  # [num_items + 1, D]

    def bind(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """This step's rows: `ids` sorted unique non-padding ids [U], `rows` [U, D]."""
        padding = torch.zeros(1, rows.shape[1], dtype=rows.dtype, device=rows.device)
        self._ids = torch.cat([ids.new_zeros(1), ids])
        self._rows = torch.cat([padding, rows])
        self._table = None

    def bind_table(self, table: torch.Tensor | None) -> None:
        self._table, self._ids, self._rows = table, None, None

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self._table is not None:
            return F.embedding(ids, self._table, padding_idx=PADDING_ID)
        if self._ids is None or self._rows is None:
            raise RuntimeError("sharded item table: rows read before this step bound them")
        flat = ids.reshape(-1)
        index = torch.searchsorted(self._ids, flat).clamp_max(len(self._ids) - 1)
        if not torch.equal(self._ids[index], flat):
            raise RuntimeError("sharded item table: an id was read that this step did not bind")
        return self._rows[index].reshape(*ids.shape, self._rows.shape[1])

    def table(self) -> torch.Tensor:
        if self._table is not None:
            return self._table
        if (
            self._ids is not None
            and self._rows is not None
            and len(self._ids) == self.num_items + 1
        ):
            return self._rows  # every id bound, in order: the full softmax's step
        raise ConfigError(
            "sharded item table: the whole table is not bound (evaluation binds it with "
            "ShardedModel.whole_table())"
        )


class ShardedModel:
    """A model whose item table is a :class:`ShardedItemTable`: the binding between them."""

    def __init__(self, model: SequentialEncoder, table: ShardedItemTable, num_items: int) -> None:
        base = model.item_embedding
        self.embedding = LookupItemEmbedding(
            num_items, base.dim, normalize=base.normalize, temperature=base.temperature
        )
        model.item_embedding = self.embedding  # the dense weight is dropped here
        self.model, self.table = model, table

    def bind_step(
        self, input_ids: torch.Tensor, target_ids: torch.Tensor, cfg: TrainConfig
    ) -> Negatives | None:
        """Draws the step's negatives and looks up, in one collective call, every row the
        step reads: its inputs, its targets and its negatives (the full softmax: all)."""
        num_items = self.embedding.num_items
        negatives = None
        if cfg.loss == "full_softmax":
            needed = torch.arange(1, num_items + 1, device=input_ids.device)
        else:
            positives = target_ids[target_ids > 0]
            negatives = draw_negatives(positives, cfg, num_items)
            everything = torch.cat([input_ids.reshape(-1), positives, negatives.ids])
            needed = torch.unique(everything[everything != PADDING_ID])  # sorted
        rows = self.table.lookup(needed)
        world_size = self.table.context.world_size
        if world_size > 1 and rows.requires_grad:
            # Each rank's loss is scaled for DDP, which averages the encoder's gradients over
            # ranks; the table's gradients are summed over ranks by the all-to-all instead.
            rows.register_hook(lambda grad: grad / world_size)  # type: ignore[no-untyped-call]
        self.embedding.bind(needed, rows)
        return negatives

    @contextmanager
    def whole_table(self, rows: int | None = None) -> Iterator[None]:
        """The gathered table (its first `rows` rows: a table with headroom for new items)
        bound for the block (collective: every rank enters it)."""
        self.embedding.bind_table(self.table.gather(rows))
        try:
            yield
        finally:
            self.embedding.bind_table(None)
