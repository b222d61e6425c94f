"""HSTU: Hierarchical Sequential Transduction Units (Zhai et al., ICML 2024, arXiv 2402.17152).

Each block replaces softmax attention + FFN by one gated "pointwise aggregated attention" unit:

    U, V, Q, K = split(SiLU(Linear(LayerNorm(x))))
    A          = SiLU(Q K^T + rab) / n, masked to real keys at or before the query (no softmax)
    x          = x + Linear(Dropout(LayerNorm(A V) * U))

where rab is a learned relative attention bias: one weight per relative position (i - j) plus
one per bucket of log time difference |t_i - t_j|. This follows facebookresearch/
generative-recommenders (modeling/sequential/hstu.py) for the traditional sequential setting,
with these choices, all made so that a left-padded window gives the same output whatever its
padded length:

- n is `max_length`, a constant, as in the reference (which always pads to the maximum length).
  Dividing by the padded length would make the output depend on the padding.
- Padding keys are masked explicitly (the reference drops them by storing sequences jagged).
- Absolute positions are counted from the most recent item (row 0 = most recent), when
  `position_embedding = "from_end"` (the default). With "none" the model has only the relative
  bias (as the paper relies on): then a position's keys and values never change when events
  are appended, and :mod:`recloop.models.hstu_kv` encodes new events incrementally.
- The time difference of query i and key j uses the query's own timestamp t_i. The reference
  uses the timestamp of the item being predicted (t_{i+1}), which `forward` does not receive.
  Without timestamps (None) the time bias is zero; the position bias still applies.
- Output: L2-normalised (the reference's L2NormEmbeddingPostprocessor) when
  `normalize_embeddings`, which also makes ItemEmbedding score cosine / temperature, as the
  reference's l2-norm similarity; otherwise a LayerNorm (its LayerNorm postprocessor) and plain
  dot-product scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from recloop.errors import ConfigError
from recloop.models.base import SequentialEncoder, window_layout
from recloop.models.dropout import Dropout, dropout
from recloop.models.embeddings import ItemEmbedding

POSITION_EMBEDDINGS = ("from_end", "none")


def _require(ok: bool, field: str, value: object, why: str) -> None:
    if not ok:
        raise ConfigError(f"hstu config: {field}={value!r} is invalid: {why}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class HSTUConfig:
    num_items: int  # catalogue size; item ids are 1..num_items, 0 is padding
    max_length: int = 50  # longest input window; sizes positional tables and the 1/n scale
    dim: int = 64
    num_blocks: int = 2
    num_heads: int = 2
    attention_dim: int | None = None  # per-head Q/K width; None -> dim // num_heads
    linear_dim: int | None = None  # per-head U/V width; None -> dim // num_heads
    dropout: float = 0.2  # on the input embeddings and before each output projection
    # On the attention weights A. The reference accepts attn_dropout_rate but never applies it,
    # so 0.0 reproduces it.
    attention_dropout: float = 0.0
    use_time_bias: bool = True  # learned bias per log-time-difference bucket
    num_time_buckets: int = 128  # the reference's value; bucket indexes are clamped to it
    # bucket = floor(ln(1 + |t_i - t_j|) / time_bucket_width): log-spaced buckets, each about
    # 1.35x wider than the last with the reference's 0.301. 128 of them cover > 10^16 seconds,
    # so with second timestamps no difference is clamped.
    time_bucket_width: float = 0.301
    # True (reference): user and item vectors are L2-normalised, logits = cosine / temperature.
    normalize_embeddings: bool = True
    temperature: float = 0.05  # the reference's softmax temperature for cosine logits
    layer_norm_eps: float = 1e-6  # the reference's epsilon
    # "from_end": a learned absolute embedding per position counted from the most recent item
    # (what every model trained so far has). "none": relative bias only; every past position's
    # state then survives an append, which incremental encoding (hstu_kv) needs.
    position_embedding: str = "from_end"
    init_std: float = 0.02  # item table, U/V/Q/K projection and bias tables (the reference)

    def __post_init__(self) -> None:
        for name in ("num_items", "max_length", "dim", "num_blocks", "num_heads"):
            value = getattr(self, name)
            _require(_is_int(value) and value > 0, name, value, "must be a positive integer")
        for name in ("attention_dim", "linear_dim"):
            value = getattr(self, name)
            if value is None:
                _require(
                    self.dim % self.num_heads == 0,
                    "num_heads",
                    self.num_heads,
                    f"must divide dim={self.dim} when {name} is not given",
                )
            else:
                _require(_is_int(value) and value > 0, name, value, "must be a positive integer")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            _require(
                isinstance(value, int | float) and 0.0 <= value < 1.0,
                name,
                value,
                "must be in [0, 1)",
            )
        _require(
            _is_int(self.num_time_buckets) and self.num_time_buckets > 0,
            "num_time_buckets",
            self.num_time_buckets,
            "must be a positive integer",
        )
        for name in ("time_bucket_width", "temperature", "layer_norm_eps", "init_std"):
            value = getattr(self, name)
            _require(isinstance(value, int | float) and value > 0, name, value, "must be > 0")
        _require(
            self.position_embedding in POSITION_EMBEDDINGS,
            "position_embedding",
            self.position_embedding,
            f"expected one of {', '.join(POSITION_EMBEDDINGS)}",
        )
        for name in ("use_time_bias", "normalize_embeddings"):
            value = getattr(self, name)
            _require(isinstance(value, bool), name, value, "must be true or false")

    @property
    def head_qk_dim(self) -> int:
        return self.attention_dim if self.attention_dim is not None else self.dim // self.num_heads

    @property
    def head_v_dim(self) -> int:
        return self.linear_dim if self.linear_dim is not None else self.dim // self.num_heads


class HSTUBlock(nn.Module):
    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qk_dim = config.head_qk_dim
        self.v_dim = config.head_v_dim
        self.max_length = config.max_length
        self.eps = config.layer_norm_eps
        self.dropout = config.dropout
        self.attention_dropout = config.attention_dropout
        heads = config.num_heads
        # One projection to [U, V, Q, K]; no bias, as the reference.
        self.uvqk = nn.Linear(config.dim, heads * (2 * self.v_dim + 2 * self.qk_dim), bias=False)
        self.output = nn.Linear(heads * self.v_dim, config.dim)
        # Relative attention bias, shared by the heads of this block: one weight per distance
        # i - j in 0..max_length-1 (causal, so negative distances never count) ...
        self.position_bias = nn.Parameter(torch.empty(config.max_length))
        # ... and one per time bucket 0..num_time_buckets.
        self.time_bias = (
            nn.Parameter(torch.empty(config.num_time_buckets + 1)) if config.use_time_bias else None
        )
        nn.init.normal_(self.uvqk.weight, std=config.init_std)
        nn.init.xavier_uniform_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        nn.init.normal_(self.position_bias, std=config.init_std)
        if self.time_bias is not None:
            nn.init.normal_(self.time_bias, std=config.init_std)

    def forward(
        self,
        x: torch.Tensor,
        allowed: torch.Tensor,
        distance: torch.Tensor,
        time_buckets: torch.Tensor | None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """x [B, L, D]; allowed [B, 1, L, L] 0/1 float; distance [L, L] and time_buckets
        [B, L, L] int64 bias indexes -> [B, L, D]. With `last_only`, only the last position
        queries (keys and values from all): -> [B, 1, D]."""
        u, v, q, k = self.project(x)
        residual = x
        if last_only:
            u, q, residual = u[:, -1:], q[:, -1:], x[:, -1:]
            allowed, distance = allowed[:, :, -1:], distance[-1:]
            time_buckets = time_buckets[:, -1:] if time_buckets is not None else None
        return self.attend(residual, u, q, k, v, self.bias(distance, time_buckets), allowed)

    def bias(self, distance: torch.Tensor, time_buckets: torch.Tensor | None) -> torch.Tensor:
        """The relative attention bias: distance [Lq, L] or [B, Lq, L] and time buckets
        [B, Lq, L] (or None) -> [Lq, L] or [B, Lq, L]."""
        bias = self.position_bias[distance]  # [Lq, L] or [B, Lq, L]
        if time_buckets is not None and self.time_bias is not None:
            bias = bias + self.time_bias[time_buckets]  # [B, Lq, L]
        return bias

    def project(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, D] -> (u, v [B, L, H * Dv], q, k [B, L, H * Dqk])."""
        heads, qk_dim, v_dim = self.num_heads, self.qk_dim, self.v_dim
        normed = F.layer_norm(x, (x.shape[-1],), eps=self.eps)  # [B, L, D]
        uvqk: torch.Tensor = F.silu(self.uvqk(normed))  # [B, L, H * (2 Dv + 2 Dqk)]
        u, v, q, k = torch.split(
            uvqk, [heads * v_dim, heads * v_dim, heads * qk_dim, heads * qk_dim], dim=-1
        )
        return u, v, q, k

    def attend(
        self,
        residual: torch.Tensor,
        u: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor,
        allowed: torch.Tensor,
    ) -> torch.Tensor:
        """Queries (residual [B, Lq, D], u [B, Lq, H * Dv], q [B, Lq, H * Dqk]) read keys k
        [B, L, H * Dqk] and values v [B, L, H * Dv] with bias [Lq, L] or [B, Lq, L] where
        allowed [B, 1, Lq, L] (0/1 float) -> [B, Lq, D]."""
        batch, queries, length = q.shape[0], q.shape[1], k.shape[1]
        heads, qk_dim, v_dim = self.num_heads, self.qk_dim, self.v_dim
        q = q.reshape(batch, queries, heads, qk_dim).transpose(1, 2)  # [B, H, Lq, Dqk]
        k = k.reshape(batch, length, heads, qk_dim).transpose(1, 2)  # [B, H, L, Dqk]
        v = v.reshape(batch, length, heads, v_dim).transpose(1, 2)  # [B, H, L, Dv]
        scores = q @ k.transpose(-1, -2) + bias.unsqueeze(-3)  # [B, H, Lq, L]
        weights = F.silu(scores) * (allowed / self.max_length)  # [B, H, Lq, L], no softmax
        weights = dropout(weights, self.attention_dropout, self.training)
        y = (weights @ v).transpose(1, 2).reshape(batch, queries, heads * v_dim)  # [B, Lq, H*Dv]
        y = u * F.layer_norm(y, (heads * v_dim,), eps=self.eps)  # [B, Lq, H * Dv]
        y = dropout(y, self.dropout, self.training)
        out: torch.Tensor = self.output(y)  # [B, Lq, D]
        return residual + out


class HSTU(SequentialEncoder):
    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.config = config
        self.item_embedding = ItemEmbedding.for_model(config)
        # Row p is the position p steps before the most recent item (row 0 = most recent).
        self.position_embedding: nn.Embedding | None = None
        if config.position_embedding == "from_end":
            self.position_embedding = nn.Embedding(config.max_length, config.dim)
            nn.init.normal_(self.position_embedding.weight, std=math.sqrt(1.0 / config.dim))
        self.embedding_dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(HSTUBlock(config) for _ in range(config.num_blocks))

    def time_buckets(
        self, timestamps: torch.Tensor, key_timestamps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, L] int64 timestamps -> [B, L, L] int64 bucket of |t_i - t_j| (query i, key j).
        With `key_timestamps` [B, Lk]: queries `timestamps` [B, Lq] -> [B, Lq, Lk]."""
        keys = timestamps if key_timestamps is None else key_timestamps
        delta = (timestamps.unsqueeze(-1) - keys.unsqueeze(-2)).abs()  # [B, Lq, Lk]
        buckets: torch.Tensor = (
            torch.log1p(delta.float()) / self.config.time_bucket_width
        )  # [B, Lq, Lk]
        return buckets.floor().long().clamp(0, self.config.num_time_buckets)

    def forward(
        self,
        input_ids: torch.Tensor,
        timestamps: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """[B, L] left-padded ids (and optional [B, L] timestamps) -> [B, L, D] causal hidden
        states: unit vectors (zero at padding) when `normalize_embeddings`. With `last_only`,
        [B, 1, D]: the last block computes only the most recent position."""
        x, keep, allowed_weights, distance, time_buckets = self._embed(input_ids, timestamps)
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            only = last_only and index == last
            x = block(x, allowed_weights, distance, time_buckets, only)  # [B, L or 1, D]
        return self._finish(x) * (keep[:, -1:] if last_only else keep)  # [B, L or 1, D]

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.normalize_embeddings:
            return F.normalize(x, dim=-1, eps=self.config.layer_norm_eps)
        return F.layer_norm(x, (self.config.dim,), eps=self.config.layer_norm_eps)

    def _embed(
        self, input_ids: torch.Tensor, timestamps: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x [B, L, D], keep [B, L, 1], allowed weights [B, 1, L, L], distance [L, L],
        time buckets [B, L, L] or None): the inputs of the blocks."""
        valid, keep, positions = window_layout(input_ids, self.config.max_length, "hstu")
        x: torch.Tensor = self.item_embedding(input_ids) * math.sqrt(self.config.dim)  # [B, L, D]
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions)  # [B, L, D]
        x = self.embedding_dropout(x) * keep  # padding rows are zero

        index = torch.arange(input_ids.shape[1], device=input_ids.device)
        distance = index.unsqueeze(1) - index.unsqueeze(0)  # [L, L], i - j
        # Query i reads key j when j <= i and j is a real item; padding queries read nothing.
        allowed = (distance >= 0) & valid[:, None, None, :]  # [B, 1, L, L]
        allowed_weights = allowed.to(x.dtype)
        distance = distance.clamp(min=0)  # future keys are masked; keep their index in range
        time_buckets = (
            self.time_buckets(timestamps)
            if timestamps is not None and self.config.use_time_bias
            else None
        )  # [B, L, L] or None

        return x, keep, allowed_weights, distance, time_buckets
