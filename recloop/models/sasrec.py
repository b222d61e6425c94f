"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018).

A causal Transformer over the item sequence: the hidden state at position t is a user vector
that scores the item at t + 1 against the shared item table. The layout follows
pmixer/SASRec.pytorch (scaled item embedding + learned positions, embedding dropout, timeline
mask, causal multi-head self-attention, position-wise FFN, LayerNorm, final LayerNorm) and the
"SASRec with cross-entropy" practice (Klenitskiy & Vasilev 2023): train it with the full-softmax
loss in `recloop.train.losses`, not with the paper's one-negative BCE.

Two choices differ from pmixer and make the output independent of how much left padding a
window has (a history padded to L=10 or to L=20 encodes to the same vector):

- Positions are counted from the most recent item: the last position is 0, the one before 1,
  and so on. With a fixed window length this is pmixer's left-to-right index with the table
  rows relabelled; unlike it, it does not depend on the window length.
- Padding keys are masked out of attention (pmixer masks only the future, so real items
  attend to padding rows). Every position may also attend to itself, so a padding query row,
  which with left padding sees nothing but padding, never has an all-masked softmax (NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from recloop.errors import ConfigError
from recloop.models.base import SequentialEncoder, window_layout
from recloop.models.dropout import Dropout, dropout
from recloop.models.embeddings import ItemEmbedding

ACTIVATIONS = ("relu", "gelu")


def _require(ok: bool, field: str, value: object, why: str) -> None:
    if not ok:
        raise ConfigError(f"sasrec config: {field}={value!r} is invalid: {why}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SASRecConfig:
    num_items: int  # catalogue size; item ids are 1..num_items, 0 is padding
    max_length: int = 50  # longest input window; sizes the positional table
    dim: int = 64
    num_blocks: int = 2
    num_heads: int = 1  # the paper uses a single head; dim must divide by it
    # Embedding, attention-weight and residual dropout; the paper uses 0.2 on dense data
    # (MovieLens) and 0.5 on sparse data (Amazon).
    dropout: float = 0.2
    # FFN hidden width = dim * ffn_multiplier. 1 is the paper / pmixer (a point-wise FFN as
    # wide as the model); 4 is the usual Transformer width, worth trying when dim is small.
    ffn_multiplier: int = 1
    activation: str = "relu"  # "relu" as the paper; "gelu" as most later Transformers
    # True: LayerNorm before each sub-layer plus a final LayerNorm (pmixer; stable when deep).
    # False: the original post-norm Transformer (LayerNorm after each residual add).
    pre_norm: bool = True
    # True: logits are cosine(user, item) / temperature; False: plain dot product (the paper).
    normalize_embeddings: bool = False
    temperature: float = 1.0  # logits are divided by it; 1.0 leaves dot products unchanged
    layer_norm_eps: float = 1e-8  # pmixer's value
    init_std: float = 0.02  # std of every weight matrix and embedding table (GPT-2 style)

    def __post_init__(self) -> None:
        for name in ("num_items", "max_length", "dim", "num_blocks", "num_heads"):
            value = getattr(self, name)
            _require(_is_int(value) and value > 0, name, value, "must be a positive integer")
        _require(
            self.dim % self.num_heads == 0,
            "num_heads",
            self.num_heads,
            f"must divide dim={self.dim}",
        )
        _require(
            _is_int(self.ffn_multiplier) and self.ffn_multiplier > 0,
            "ffn_multiplier",
            self.ffn_multiplier,
            "must be a positive integer",
        )
        _require(
            isinstance(self.dropout, int | float) and 0.0 <= self.dropout < 1.0,
            "dropout",
            self.dropout,
            "must be in [0, 1)",
        )
        _require(
            self.activation in ACTIVATIONS,
            "activation",
            self.activation,
            f"must be one of {', '.join(ACTIVATIONS)}",
        )
        _require(
            isinstance(self.temperature, int | float) and self.temperature > 0,
            "temperature",
            self.temperature,
            "must be > 0",
        )
        _require(
            isinstance(self.layer_norm_eps, int | float) and self.layer_norm_eps > 0,
            "layer_norm_eps",
            self.layer_norm_eps,
            "must be > 0",
        )
        _require(
            isinstance(self.init_std, int | float) and self.init_std > 0,
            "init_std",
            self.init_std,
            "must be > 0",
        )
        for name in ("pre_norm", "normalize_embeddings"):
            value = getattr(self, name)
            _require(isinstance(value, bool), name, value, "must be true or false")


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention. `head_dim` defaults to dim // num_heads; structured
    pruning (recloop.compress) builds narrower ones, with num_heads * head_dim < dim."""

    def __init__(
        self, dim: int, num_heads: int, dropout: float, head_dim: int | None = None
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim if head_dim is not None else dim // num_heads
        self.dropout = dropout
        inner = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False
    ) -> torch.Tensor:
        """x [B, L, D], allowed [B, 1, L, L] (True = query may attend to key) -> [B, L, D];
        with `last_only`, only the last position queries: -> [B, 1, D]."""
        batch, length, _ = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        inner = heads * head_dim
        q, k, v = self.qkv(x).split(inner, dim=-1)  # 3 x [B, L, H * Dh]
        if last_only:
            q, allowed = q[:, -1:], allowed[:, :, -1:]  # [B, 1, H * Dh], [B, 1, 1, L]
        queries = q.shape[1]
        q = q.view(batch, queries, heads, head_dim).transpose(1, 2)  # [B, H, Lq, Dh]
        k = k.view(batch, length, heads, head_dim).transpose(1, 2)  # [B, H, L, Dh]
        v = v.view(batch, length, heads, head_dim).transpose(1, 2)  # [B, H, L, Dh]
        if self.training and self.dropout > 0.0 and x.device.type == "cpu":
            # SDPA's own dropout draws its mask with bernoulli_, the slow CPU path that
            # recloop.models.dropout avoids; the weights are small ([B, H, Lq, L]).
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)  # [B, H, Lq, L]
            scores = scores.masked_fill(~allowed, float("-inf"))
            y = dropout(scores.softmax(dim=-1), self.dropout, training=True) @ v
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
            )  # [B, H, Lq, Dh]
        y = y.transpose(1, 2).reshape(batch, queries, inner)  # [B, Lq, H * Dh]
        out: torch.Tensor = self.proj(y)  # [B, Lq, D]
        return out


class FeedForward(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        hidden = config.dim * config.ffn_multiplier
        self.up = nn.Linear(config.dim, hidden)
        self.down = nn.Linear(hidden, config.dim)
        self.activation = nn.GELU() if config.activation == "gelu" else nn.ReLU()
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.activation(self.up(x)))  # [B, L, D * ffn_multiplier]
        out: torch.Tensor = self.down(h)  # [B, L, D]
        return out


class Block(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.pre_norm = config.pre_norm
        self.attention_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.attention = CausalSelfAttention(config.dim, config.num_heads, config.dropout)
        self.ffn_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)
        self.dropout = Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False
    ) -> torch.Tensor:
        """x [B, L, D] -> [B, L, D]; with `last_only`, the last position only: [B, 1, D]."""
        residual = x[:, -1:] if last_only else x
        out: torch.Tensor
        if self.pre_norm:
            attended = self.attention(self.attention_norm(x), allowed, last_only)
            out = residual + self.dropout(attended)
            out = out + self.dropout(self.ffn(self.ffn_norm(out)))
        else:
            attended = self.attention(x, allowed, last_only)
            out = self.attention_norm(residual + self.dropout(attended))
            out = self.ffn_norm(out + self.dropout(self.ffn(out)))
        return out


class SASRec(SequentialEncoder):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        self.item_embedding = ItemEmbedding.for_model(config)
        # Row p is the position p steps before the most recent item (row 0 = most recent).
        self.position_embedding = nn.Embedding(config.max_length, config.dim)
        self.embedding_dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_blocks))
        # Pre-norm leaves the residual stream un-normalised, so it needs a last LayerNorm;
        # post-norm blocks already end in one.
        self.final_norm = (
            nn.LayerNorm(config.dim, eps=config.layer_norm_eps) if config.pre_norm else None
        )
        self.apply(partial(normal_init, std=config.init_std))

    def forward(
        self,
        input_ids: torch.Tensor,
        timestamps: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """[B, L] left-padded ids -> [B, L, D] causal hidden states (zero at padding).

        With `last_only`, [B, 1, D]: the last block computes only the most recent position
        (keys and values still come from every position), which saves its attention,
        projection and FFN for L - 1 positions (serving, evaluation, prefix training).
        `timestamps` is accepted for interface compatibility and ignored: SASRec sees order only.
        """
        del timestamps
        x, allowed, keep = self._embed(input_ids)
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            x = block(x, allowed, last_only and index == last)  # [B, L or 1, D]
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x * (keep[:, -1:] if last_only else keep)  # [B, L or 1, D]

    def _embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x [B, L, D] input embeddings, allowed [B, 1, L, L] attention mask, keep [B, L, 1])."""
        valid, keep, positions = window_layout(input_ids, self.config.max_length, "sasrec")
        x: torch.Tensor = self.item_embedding(input_ids) * math.sqrt(self.config.dim)  # [B, L, D]
        x = x + self.position_embedding(positions)  # [B, L, D]
        x = self.embedding_dropout(x) * keep  # timeline mask: padding rows are zero

        return x, causal_attention_mask(valid), keep


def normal_init(module: nn.Module, std: float) -> None:
    """GPT-2 style: N(0, std) weights for Linear and Embedding layers, zero Linear biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)


def causal_attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, L] real-item flags -> [B, 1, L, L] (all heads): query t may attend to key s <= t
    when s is a real item, and always to itself (so no softmax row is all-masked)."""
    length = valid.shape[1]
    index = torch.arange(length, device=valid.device)
    causal = index.unsqueeze(1) >= index.unsqueeze(0)  # [L, L]
    itself = torch.eye(length, dtype=torch.bool, device=valid.device)  # [L, L]
    return causal & (valid[:, None, None, :] | itself)
