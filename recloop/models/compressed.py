"""The modules a compressed model is made of, and the JSON spec that rebuilds them.

A compressed SASRec / HSTU is the ordinary model with some modules swapped:

- :class:`CompressedItemEmbedding` for the item table: rows stored as 8- or 4-bit codes with a
  per-row scale and offset (dequantized on lookup and for scoring), and/or only the rows of
  live items (``slots`` maps item id -> stored row; row 0 is the zero row of padding and of
  pruned items);
- :class:`QuantizedLinear` for every Linear of the blocks: int8 weight, one scale per output
  channel, float bias;
- per block, narrower attention and FFN after structured pruning (a narrower SASRec
  :class:`~recloop.models.sasrec.CausalSelfAttention`, fewer heads / channels for HSTU).

:class:`CompressionSpec` says which, and is stored as the ``compression`` entry of the model
config in the manifest. ``build_model`` calls :func:`apply_compression` with it on a freshly
built model, which then has exactly the state-dict keys and shapes of the compressed weights.
State-dict names are kept where they mean the same thing: the stored table rows are still
``item_embedding.weight`` (int8 / uint8 codes when quantized) and a Linear's codes ``*.weight``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recloop.data.sequences import PADDING_ID
from recloop.errors import ConfigError
from recloop.models.base import SequentialEncoder
from recloop.models.codec import code_columns, dequantize_channels, dequantize_rows
from recloop.models.embeddings import ItemEmbedding
from recloop.models.hstu import HSTU
from recloop.models.sasrec import CausalSelfAttention, SASRec

EMBEDDING_BITS = (32, 8, 4)
LINEAR_BITS = (32, 8)
SASREC_BLOCK_KEYS = ("heads", "head_dim", "ffn")
HSTU_BLOCK_KEYS = ("heads", "qk_dim", "v_dim")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CompressionSpec:
    """How a compressed model differs from the plain one its config describes."""

    embedding_bits: int = 32  # 32: float rows; 8 or 4: row-wise quantized codes
    linear_bits: int = 32  # 8: every Linear of the blocks int8 per output channel
    # Stored table rows (the zero row + live items) when dead items were pruned; None: all.
    item_rows: int | None = None
    # Per block after structured pruning: SASRec {"heads", "head_dim", "ffn"}, HSTU {"heads",
    # "qk_dim", "v_dim"} (per-head widths). None: the config's own structure.
    blocks: tuple[dict[str, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.embedding_bits not in EMBEDDING_BITS:
            raise ConfigError(
                f"compression.embedding_bits must be one of {EMBEDDING_BITS}, "
                f"got {self.embedding_bits!r}"
            )
        if self.linear_bits not in LINEAR_BITS:
            raise ConfigError(
                f"compression.linear_bits must be one of {LINEAR_BITS}, got {self.linear_bits!r}"
            )
        if self.item_rows is not None and (not _is_int(self.item_rows) or self.item_rows < 1):
            raise ConfigError(
                f"compression.item_rows must be a positive integer or null, got {self.item_rows!r}"
            )
        if self.blocks is not None:
            if isinstance(self.blocks, list):  # from JSON
                object.__setattr__(self, "blocks", tuple(self.blocks))
            for index, block in enumerate(self.blocks or ()):
                if not isinstance(block, Mapping) or not block:
                    raise ConfigError(f"compression.blocks[{index}] must be a non-empty object")
                for key, value in block.items():
                    if not _is_int(value) or value < 1:
                        raise ConfigError(
                            f"compression.blocks[{index}].{key} must be a positive integer, "
                            f"got {value!r}"
                        )

    @property
    def is_quantized(self) -> bool:
        return self.embedding_bits < 32 or self.linear_bits < 32

    @property
    def is_identity(self) -> bool:
        return self == CompressionSpec()

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["blocks"] = None if self.blocks is None else [dict(b) for b in self.blocks]
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CompressionSpec:
        if not isinstance(values, Mapping):
            raise ConfigError(f"compression must be an object, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown compression key(s): {', '.join(unknown)}; "
                f"expected some of {', '.join(sorted(known))}"
            )
        return cls(**values)


def blocks_of(model: nn.Module) -> list[Any]:
    """The model's blocks (SASRec Block / HSTUBlock), typed loosely: their sub-modules differ."""
    blocks: Any = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError(f"{type(model).__name__} has no blocks to compress")
    return list(blocks)


def set_compression(model: nn.Module, spec: CompressionSpec) -> None:
    """Records on `model` how it was compressed (config_to_dict writes it to the manifest)."""
    vars(model)["compression"] = spec


def compression_of(model: nn.Module) -> CompressionSpec:
    """The spec a model was built or compressed with (the identity for a plain model)."""
    spec = getattr(model, "compression", None)
    return spec if isinstance(spec, CompressionSpec) else CompressionSpec()


# --------------------------------------------------------------------------- item table


class CompressedItemEmbedding(ItemEmbedding):
    """The item table with quantized rows and/or only the rows of live items.

    Same interface as :class:`ItemEmbedding` (lookup, ``output_table``, ``logits``), so the
    models, evaluation, training losses and serving use it unchanged. Buffers:

    - ``weight``: stored rows; float32 [R, D] (a Parameter, trainable) when ``bits`` is 32,
      int8 [R, D] when 8, uint8 [R, ceil(D / 2)] (two 4-bit codes per byte) when 4;
    - ``scale``, ``offset``: float32 [R], quantized rows only;
    - ``slots``: int64 [num_items + 1], item id -> stored row, when ``rows`` is given (pruned
      items and padding map to row 0, which is all zeros).
    """

    scale: torch.Tensor
    offset: torch.Tensor

    def __init__(
        self,
        num_items: int,
        dim: int,
        *,
        normalize: bool = False,
        temperature: float = 1.0,
        bits: int = 8,
        rows: int | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not ItemEmbedding's: it would allocate a float table
        if bits not in EMBEDDING_BITS:
            raise ConfigError(f"embedding bits must be one of {EMBEDDING_BITS}, got {bits!r}")
        self.num_items = num_items
        self.dim = dim
        self.normalize = normalize
        self.temperature = temperature
        self.bits = bits
        stored = num_items + 1 if rows is None else rows
        self.stored_rows = stored
        if bits == 32:
            self.weight = nn.Parameter(torch.zeros(stored, dim))
        else:
            dtype = torch.int8 if bits == 8 else torch.uint8
            self.register_buffer(
                "weight", torch.zeros(stored, code_columns(dim, bits), dtype=dtype)
            )
            self.register_buffer("scale", torch.zeros(stored))
            self.register_buffer("offset", torch.zeros(stored))
        self.slots: torch.Tensor | None
        if rows is None:
            self.slots = None
        else:
            self.register_buffer("slots", torch.zeros(num_items + 1, dtype=torch.int64))

    @classmethod
    def from_table(
        cls,
        table: torch.Tensor,
        *,
        normalize: bool,
        temperature: float,
        bits: int,
        live: torch.Tensor | None = None,
    ) -> CompressedItemEmbedding:
        """From a float table [num_items + 1, D]; `live` [num_items + 1] bool keeps only the
        rows of live items (row 0, padding, is never live)."""
        from recloop.models.codec import quantize_rows

        num_items, dim = table.shape[0] - 1, table.shape[1]
        rows = table.detach().float().clone()  # [I + 1, D]
        rows[PADDING_ID] = 0.0
        slots = None
        if live is not None:
            keep = live.clone().bool()
            keep[PADDING_ID] = False
            ids = torch.nonzero(keep).squeeze(1)  # [K] live item ids, ascending
            slots = torch.zeros(num_items + 1, dtype=torch.int64)
            slots[ids] = torch.arange(1, len(ids) + 1)
            rows = torch.cat([rows[:1], rows[ids]])  # [K + 1, D], row 0 zero
        module = cls(
            num_items,
            dim,
            normalize=normalize,
            temperature=temperature,
            bits=bits,
            rows=None if slots is None else rows.shape[0],
        )
        with torch.no_grad():
            if bits == 32:
                module.weight.copy_(rows)
            else:
                codes, scale, offset = quantize_rows(rows, bits)
                module.weight.copy_(codes)
                module.scale.copy_(scale)
                module.offset.copy_(offset)
            if slots is not None and module.slots is not None:
                module.slots.copy_(slots)
        return module

    def _stored(self, rows: torch.Tensor) -> torch.Tensor:
        """Float values [..., D] of stored rows `rows` [...]."""
        if self.bits == 32:
            return F.embedding(rows, self.weight, padding_idx=PADDING_ID)
        codes = self.weight[rows]  # [..., C]
        return dequantize_rows(codes, self.scale[rows], self.offset[rows], self.bits, self.dim)

    def _rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        return self.slots[ids] if self.slots is not None else ids

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._stored(self._rows_of(ids))  # [..., D]

    def table(self) -> torch.Tensor:
        """Every item's float row [num_items + 1, D] (pruned items and padding: zeros)."""
        if self.slots is not None:
            return self._stored(self.slots)
        if self.bits == 32:
            return self.weight
        return dequantize_rows(self.weight, self.scale, self.offset, self.bits, self.dim)

    def output_table(self) -> torch.Tensor:
        table = self.table()
        return F.normalize(table, dim=-1) if self.normalize else table

    def output_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.forward(ids)
        return F.normalize(rows, dim=-1) if self.normalize else rows


# --------------------------------------------------------------------------- dense layers


class QuantizedLinear(nn.Module):
    """A Linear with an int8 weight [out, in] and one float scale per output channel."""

    weight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.zeros(out_features))
        self.bias: torch.Tensor | None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantizedLinear:
        from recloop.models.codec import quantize_channels

        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        codes, scale = quantize_channels(linear.weight)
        with torch.no_grad():
            module.weight.copy_(codes)
            module.scale.copy_(scale)
            if linear.bias is not None and module.bias is not None:
                module.bias.copy_(linear.bias.detach().float())
        return module

    def dequantized(self) -> nn.Linear:
        """The equivalent float Linear (for exporters that quantize float weights themselves)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(dequantize_channels(self.weight, self.scale))
            if self.bias is not None and linear.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_channels(self.weight, self.scale)  # [out, in]
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


# --------------------------------------------------------------------------- rebuilding


def block_structure(model: SequentialEncoder) -> list[dict[str, int]]:
    """The current per-block structure of a SASRec / HSTU (see CompressionSpec.blocks)."""
    if isinstance(model, SASRec):
        result = []
        for block in blocks_of(model):
            attention = block.attention
            heads = int(attention.num_heads)
            head_dim = int(attention.head_dim)
            result.append({"heads": heads, "head_dim": head_dim, "ffn": _out(block.ffn.up)})
        return result
    if isinstance(model, HSTU):
        return [
            {"heads": int(b.num_heads), "qk_dim": int(b.qk_dim), "v_dim": int(b.v_dim)}
            for b in blocks_of(model)
        ]
    raise ConfigError(f"{type(model).__name__} models cannot be compressed")


def _out(linear: nn.Module) -> int:
    return int(getattr(linear, "out_features"))  # noqa: B009  # Linear or QuantizedLinear


def apply_compression(model: SequentialEncoder, spec: CompressionSpec | Mapping[str, Any]) -> None:
    """Swaps `model`'s modules (in place) for empty ones of the compressed shapes, so that
    ``load_state_dict`` of the compressed weights fits exactly. Records the spec on the model."""
    if not isinstance(spec, CompressionSpec):
        spec = CompressionSpec.from_dict(spec)
    if spec.blocks is not None:
        if not isinstance(model, SASRec | HSTU):  # quantization fits any model's blocks
            raise ConfigError(
                f"structured pruning supports sasrec and hstu models, not {type(model).__name__}"
            )
        set_block_structure(model, list(spec.blocks))
    if spec.linear_bits == 8:
        quantize_linears(model, empty=True)
    if spec.embedding_bits < 32 or spec.item_rows is not None:
        old = model.item_embedding
        model.item_embedding = CompressedItemEmbedding(
            old.num_items,
            old.dim,
            normalize=old.normalize,
            temperature=old.temperature,
            bits=spec.embedding_bits,
            rows=spec.item_rows,
        )
    set_compression(model, spec)


def set_block_structure(model: SequentialEncoder, blocks: list[dict[str, int]]) -> None:
    """Replaces each block's attention / FFN (SASRec) or U, V, Q, K projections (HSTU) with
    freshly initialised ones of the given widths."""
    if len(blocks) != len(blocks_of(model)):
        raise ConfigError(
            f"compression.blocks has {len(blocks)} entries but the model has "
            f"{len(blocks_of(model))} blocks"
        )
    dim = int(model.config.dim)
    for index, (block, shape) in enumerate(zip(blocks_of(model), blocks, strict=True)):
        keys = SASREC_BLOCK_KEYS if isinstance(model, SASRec) else HSTU_BLOCK_KEYS
        if sorted(shape) != sorted(keys):
            raise ConfigError(
                f"compression.blocks[{index}] has keys {sorted(shape)}, expected {list(keys)}"
            )
        if isinstance(model, SASRec):
            block.attention = CausalSelfAttention(
                dim, shape["heads"], float(model.config.dropout), head_dim=shape["head_dim"]
            )
            block.ffn.up = nn.Linear(dim, shape["ffn"])
            block.ffn.down = nn.Linear(shape["ffn"], dim)
        else:
            heads, qk_dim, v_dim = shape["heads"], shape["qk_dim"], shape["v_dim"]
            block.num_heads, block.qk_dim, block.v_dim = heads, qk_dim, v_dim
            block.uvqk = nn.Linear(dim, heads * (2 * v_dim + 2 * qk_dim), bias=False)
            block.output = nn.Linear(heads * v_dim, dim)


def quantize_linears(model: SequentialEncoder, *, empty: bool = False) -> int:
    """Replaces every nn.Linear inside the blocks by a QuantizedLinear (quantized from it, or
    empty to be loaded). Returns how many were replaced."""
    replaced = 0
    for block in blocks_of(model):
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    if empty:
                        new = QuantizedLinear(
                            child.in_features, child.out_features, bias=child.bias is not None
                        )
                    else:
                        new = QuantizedLinear.from_linear(child)
                    setattr(parent, name, new)
                    replaced += 1
    return replaced


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in the state dict (what the weights file holds, headers aside)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def count_dense_parameters(model: SequentialEncoder) -> tuple[int, int]:
    """(non-zero, total) weight entries of the blocks' Linear layers (not biases, not tables)."""
    nonzero = total = 0
    for block in blocks_of(model):
        for module in block.modules():
            if isinstance(module, nn.Linear | QuantizedLinear):
                weight = module.weight
                total += weight.numel()
                nonzero += int(torch.count_nonzero(weight))
    return nonzero, total
