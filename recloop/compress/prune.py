"""Pruning: global unstructured magnitude pruning, and structured pruning that shrinks shapes.

Both act on the dense layers of the blocks (the Linear weights); the item table, positions,
biases and norms are not magnitude-pruned. Each is followed by a short fine-tune
(:func:`recloop.compress.finetune.fit`, see :mod:`recloop.compress.pipeline`).

- Magnitude (:func:`prune_magnitude`): the `sparsity` fraction of Linear weights with the
  smallest |w|, ranked globally over all blocks, set to zero; the fine-tune re-applies the mask
  after every step. Shapes do not change, so the file (dense zeros) and the latency of dense
  kernels do not either: this measures how much accuracy the weights can lose.
- Structured (:func:`prune_structured`): in every block, whole attention heads are removed
  first (``round((1 - sparsity) * heads)`` kept, at least 1, by the L2 norm of their weights),
  then channels inside each remaining head (SASRec: query/key/value channels; HSTU: U/V and
  Q/K channels, the same count per head) until the block keeps ``1 - sparsity`` of its
  attention weights, and SASRec's FFN keeps ``1 - sparsity`` of its hidden units (by the norm
  of their input row times their output column). Optionally the table rows of dead items
  (never in the training split) go too. The Linear layers get smaller, so the file and the
  latency shrink.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from recloop.data.dataset import SequenceDataset
from recloop.errors import ConfigError
from recloop.models.base import SequentialEncoder
from recloop.models.compressed import (
    CompressedItemEmbedding,
    block_structure,
    blocks_of,
    compression_of,
    set_compression,
)
from recloop.models.hstu import HSTU, HSTUBlock
from recloop.models.sasrec import CausalSelfAttention, SASRec

Masks = dict[str, torch.Tensor]


def check_sparsity(sparsity: object) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float):
        raise ConfigError(f"sparsity must be a number in (0, 1), got {sparsity!r}")
    if not 0.0 < float(sparsity) < 1.0:
        raise ConfigError(f"sparsity must be in (0, 1) (exclusive), got {sparsity}")
    return float(sparsity)


def _check_float(model: SequentialEncoder, method: str) -> None:
    spec = compression_of(model)
    if spec.is_quantized:
        raise ConfigError(
            f"{method} needs float weights to fine-tune, but this model is quantized "
            f"(embedding {spec.embedding_bits} bits, dense {spec.linear_bits} bits): "
            "prune its float parent, then quantize"
        )
    if not isinstance(model, SASRec | HSTU):
        raise ConfigError(f"{method} supports sasrec and hstu models, not {type(model).__name__}")


# --------------------------------------------------------------------------- magnitude


def dense_weights(model: SequentialEncoder) -> dict[str, torch.Tensor]:
    """The Linear weight matrices of the blocks, by state-dict name."""
    return {
        f"blocks.{index}.{name}.weight": module.weight
        for index, block in enumerate(blocks_of(model))
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    }


def magnitude_masks(model: SequentialEncoder, sparsity: float) -> Masks:
    """Keep-masks (True = kept) removing exactly round(sparsity * total) dense weights, those
    of smallest magnitude over all blocks together (ties broken by position)."""
    sparsity = check_sparsity(sparsity)
    weights = dense_weights(model)
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])  # [N]
    drop = round(sparsity * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:drop]] = False
    masks: Masks = {}
    start = 0
    for name, weight in weights.items():
        masks[name] = keep[start : start + weight.numel()].view_as(weight)
        start += weight.numel()
    return masks


def apply_masks(model: SequentialEncoder, masks: Masks) -> None:
    weights = dense_weights(model)
    with torch.no_grad():
        for name, mask in masks.items():
            weights[name].mul_(mask)


def prune_magnitude(model: SequentialEncoder, sparsity: float) -> tuple[SequentialEncoder, Masks]:
    """(pruned copy of `model`, its masks); re-apply the masks after each fine-tuning step."""
    _check_float(model, "prune-magnitude")
    pruned = copy.deepcopy(model).cpu()
    masks = magnitude_masks(pruned, sparsity)
    apply_masks(pruned, masks)
    return pruned, masks


# --------------------------------------------------------------------------- structured


def dead_items(dataset: SequenceDataset) -> npt.NDArray[np.bool_]:
    """[num_items + 1] True for items that never occur in the leave-one-out training split
    (row 0, padding, is True too): their table rows carry nothing the training has learned."""
    train = dataset.leave_one_out().train
    counts = np.bincount(np.asarray(train.items), minlength=dataset.num_items + 1)
    dead: npt.NDArray[np.bool_] = counts[: dataset.num_items + 1] == 0
    return dead


def _keep_count(total: int, fraction: float) -> int:
    return max(1, min(total, round(fraction * total)))


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest scores, in ascending index order (stable layout)."""
    return torch.sort(torch.topk(scores, count).indices).values


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None and layer.bias is not None:
            layer.bias.copy_(bias)
    return layer


def _prune_sasrec_block(block: Any, dim: int, sparsity: float, dropout: float) -> None:
    attention = block.attention
    heads = int(attention.num_heads)
    head_dim = int(attention.head_dim)
    inner = heads * head_dim
    qkv_w, qkv_b = attention.qkv.weight.detach(), attention.qkv.bias.detach()  # [3I, D], [3I]
    proj_w, proj_b = attention.proj.weight.detach(), attention.proj.bias.detach()  # [D, I], [D]
    # Per (head, channel): its query, key and value rows and its output column.
    rows = qkv_w.view(3, heads, head_dim, dim).pow(2).sum(dim=(0, 3))  # [H, Dh]
    cols = proj_w.view(dim, heads, head_dim).pow(2).sum(dim=0)  # [H, Dh]
    importance = rows + cols  # [H, Dh]
    kept_heads = _top(importance.sum(dim=1), _keep_count(heads, 1 - sparsity))  # [H']
    channels = _keep_count(head_dim, (1 - sparsity) * heads / len(kept_heads))
    kept = [h * head_dim + _top(importance[h], channels) for h in kept_heads.tolist()]
    inner_index = torch.cat(kept)  # [H' * Dh'] positions in the attention width
    qkv_index = torch.cat([inner_index + part * inner for part in range(3)])
    new = CausalSelfAttention(dim, len(kept_heads), dropout, head_dim=channels)
    new.qkv = _linear(qkv_w[qkv_index], qkv_b[qkv_index])
    new.proj = _linear(proj_w[:, inner_index], proj_b)
    block.attention = new

    up, down = block.ffn.up, block.ffn.down
    score = up.weight.detach().norm(dim=1) * down.weight.detach().norm(dim=0)  # [F]
    units = _top(score, _keep_count(up.out_features, 1 - sparsity))
    block.ffn.up = _linear(up.weight.detach()[units], up.bias.detach()[units])
    block.ffn.down = _linear(down.weight.detach()[:, units], down.bias.detach())


def _prune_hstu_block(block: HSTUBlock, sparsity: float) -> None:
    heads, qk_dim, v_dim = block.num_heads, block.qk_dim, block.v_dim
    weight = block.uvqk.weight.detach()  # [H (2 Dv + 2 Dqk), D]
    dim = weight.shape[1]
    u, v, q, k = torch.split(weight, [heads * v_dim, heads * v_dim, heads * qk_dim, heads * qk_dim])
    out_w = block.output.weight.detach()  # [D, H Dv]
    v_importance = (
        u.view(heads, v_dim, dim).pow(2).sum(-1)
        + v.view(heads, v_dim, dim).pow(2).sum(-1)
        + out_w.view(dim, heads, v_dim).pow(2).sum(0)
    )  # [H, Dv]
    qk_importance = q.view(heads, qk_dim, dim).pow(2).sum(-1) + k.view(heads, qk_dim, dim).pow(
        2
    ).sum(-1)  # [H, Dqk]
    head_score = v_importance.sum(1) + qk_importance.sum(1)  # [H]
    kept_heads = _top(head_score, _keep_count(heads, 1 - sparsity)).tolist()
    left = (1 - sparsity) * heads / len(kept_heads)  # fraction of channels each head keeps
    new_v, new_qk = _keep_count(v_dim, left), _keep_count(qk_dim, left)
    v_index = torch.cat([h * v_dim + _top(v_importance[h], new_v) for h in kept_heads])
    qk_index = torch.cat([h * qk_dim + _top(qk_importance[h], new_qk) for h in kept_heads])
    block.num_heads, block.qk_dim, block.v_dim = len(kept_heads), new_qk, new_v
    block.uvqk = _linear(torch.cat([u[v_index], v[v_index], q[qk_index], k[qk_index]]), None)
    block.output = _linear(out_w[:, v_index], block.output.bias.detach())


def prune_structured(
    model: SequentialEncoder,
    sparsity: float,
    *,
    dead: npt.NDArray[np.bool_] | None = None,
) -> SequentialEncoder:
    """A structurally pruned copy of `model` (see the module docstring); `dead` [I + 1] marks
    the items whose table rows are dropped (None keeps every row)."""
    _check_float(model, "prune-structured")
    sparsity = check_sparsity(sparsity)
    pruned = copy.deepcopy(model).cpu()
    with torch.no_grad():
        for block in blocks_of(pruned):
            if isinstance(pruned, SASRec):
                dim, dropout = int(pruned.config.dim), float(pruned.config.dropout)
                _prune_sasrec_block(block, dim, sparsity, dropout)
            else:
                _prune_hstu_block(block, sparsity)
    spec = dataclasses.replace(compression_of(pruned), blocks=tuple(block_structure(pruned)))
    if dead is not None:
        table = pruned.item_embedding
        if isinstance(table, CompressedItemEmbedding):
            raise ConfigError("this model's dead item rows were pruned already")
        live = torch.from_numpy(~np.asarray(dead, dtype=bool))
        if live.shape != (table.num_items + 1,):
            raise ConfigError(
                f"dead-item mask has {live.shape[0]} entries, the model has "
                f"{table.num_items + 1} table rows"
            )
        pruned.item_embedding = CompressedItemEmbedding.from_table(
            table.weight, normalize=table.normalize, temperature=table.temperature, bits=32,
            live=live,
        )  # fmt: skip
        spec = dataclasses.replace(spec, item_rows=pruned.item_embedding.stored_rows)
    set_compression(pruned, spec)
    return pruned
