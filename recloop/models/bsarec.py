"""BSARec: Beyond Self-Attention for sequential Recommendation (Shin et al., AAAI 2024,
arXiv 2312.10325).

Each block mixes two views of the sequence and then applies a position-wise FFN:

    dsp = LayerNorm(x + Dropout(low(x) + beta^2 * (x - low(x))))   # frequency filter
    gsp = LayerNorm(x + Dropout(SelfAttention(x)))                  # causal self-attention
    h   = alpha * dsp + (1 - alpha) * gsp
    x   = LayerNorm(h + Dropout(W2 GELU(W1 h)))

low(x) keeps the `c // 2 + 1` lowest frequencies of the window along the sequence (rfft,
zero the rest, irfft over a window of `max_length`), and the learned per-channel beta rescales
the high frequencies, the "attentive inductive bias" that self-attention, a low-pass filter,
lacks. The layout follows jeongwhanchoi/BSARec (post-norm blocks, LayerNorm'd input embeddings
with learned positions, GELU FFN 4x wide, dot-product scores), with one recloop choice:

- Padding rows are zero at every layer (the reference filters LayerNorm(position embedding)
  rows of the padding too). With zero padding, the filter of a left-padded window of
  `max_length` equals multiplying the real positions by the corresponding block of a fixed
  circulant matrix, so a window trimmed of its padding gives exactly the output of the full
  one, as for SASRec and HSTU, and training can drop padding columns.

The filter sees the whole window, later items included, so the model is NOT causal
(`causal = False`): the hidden state at an inner position depends on what follows it. Only the
last position is a user vector. Train it on every prefix as its own sample with the loss at
the last position (`train.samples = "prefixes"`, the reference's training), never on every
position of a window, which would let each position see its own target.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import cast

import torch
from torch import nn

from recloop.errors import ConfigError
from recloop.models.base import SequentialEncoder, window_layout
from recloop.models.dropout import Dropout
from recloop.models.embeddings import ItemEmbedding
from recloop.models.sasrec import CausalSelfAttention, causal_attention_mask, normal_init


def _require(ok: bool, field: str, value: object, why: str) -> None:
    if not ok:
        raise ConfigError(f"bsarec config: {field}={value!r} is invalid: {why}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_fraction(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0


@dataclass
class BSARecConfig:
    num_items: int  # catalogue size; item ids are 1..num_items, 0 is padding
    max_length: int = 50  # window the filter's frequencies are defined over; sizes positions
    dim: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.5  # embeddings, residual branches and the FFN (the reference's Beauty)
    attention_dropout: float = 0.5  # on the attention weights (the reference's Beauty)
    # Weight of the frequency filter against self-attention in each block (the reference's
    # Beauty value 0.7); 1 = filter only, 0 = attention only.
    alpha: float = 0.7
    # Frequency cut-off: the filter keeps the c // 2 + 1 lowest of the window's frequencies
    # (the reference's Beauty value 5 keeps 3 of 26).
    c: int = 5
    ffn_multiplier: int = 4
    # True: logits are cosine(user, item) / temperature; False: dot product (the reference).
    normalize_embeddings: bool = False
    temperature: float = 1.0
    layer_norm_eps: float = 1e-12  # the reference's value
    init_std: float = 0.02  # the reference's initializer_range

    def __post_init__(self) -> None:
        positive = (
            "num_items",
            "max_length",
            "dim",
            "num_blocks",
            "num_heads",
            "c",
            "ffn_multiplier",
        )
        for name in positive:
            value = getattr(self, name)
            _require(_is_int(value) and value > 0, name, value, "must be a positive integer")
        heads = self.num_heads
        _require(self.dim % heads == 0, "num_heads", heads, f"must divide dim={self.dim}")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            _require(_is_fraction(value) and value < 1.0, name, value, "must be in [0, 1)")
        _require(_is_fraction(self.alpha), "alpha", self.alpha, "must be in [0, 1]")
        for name in ("temperature", "layer_norm_eps", "init_std"):
            value = getattr(self, name)
            _require(isinstance(value, int | float) and value > 0, name, value, "must be > 0")
        _require(
            isinstance(self.normalize_embeddings, bool),
            "normalize_embeddings",
            self.normalize_embeddings,
            "must be true or false",
        )


def low_pass_matrix(length: int, c: int) -> torch.Tensor:
    """[length, length] P with P @ x = irfft(rfft(x) with only the c // 2 + 1 lowest
    frequencies kept) along the first axis of x: the reference's filter as one matmul.

    P is circulant (a shift of the window shifts the output), so the filter restricted to the
    last W positions of a window whose other rows are zero is the top-left W x W block.
    """
    keep = c // 2 + 1
    eye = torch.eye(length, dtype=torch.float64)
    spectrum = torch.fft.rfft(eye, dim=0, norm="ortho")  # [length // 2 + 1, length]
    spectrum[keep:] = 0
    matrix: torch.Tensor = torch.fft.irfft(spectrum, n=length, dim=0, norm="ortho")
    return matrix.float()  # [length, length]


class FrequencyFilter(nn.Module):
    """LayerNorm(x + Dropout(low + beta^2 * high)): the block's "dsp" branch."""

    def __init__(self, config: BSARecConfig) -> None:
        super().__init__()
        # A function of the config, so not saved with the weights.
        self.register_buffer(
            "low_pass", low_pass_matrix(config.max_length, config.c), persistent=False
        )
        self.sqrt_beta = nn.Parameter(torch.randn(config.dim))  # the reference's init
        self.dropout = Dropout(config.dropout)
        self.norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x [B, W, D], zero at padding, W <= max_length -> [B, W, D]; with `last_only`, the
        last position only (filtered from every position): [B, 1, D]."""
        width = x.shape[1]
        rows = slice(width - 1, width) if last_only else slice(0, width)
        low_pass = cast(torch.Tensor, self.low_pass)[rows, :width]  # [W or 1, W]
        low = torch.matmul(low_pass.to(x.dtype), x)  # [B, W or 1, D]
        here = x[:, rows]  # [B, W or 1, D]
        filtered = low + self.sqrt_beta.square() * (here - low)
        out: torch.Tensor = self.norm(here + self.dropout(filtered))
        return out


class BSARecBlock(nn.Module):
    def __init__(self, config: BSARecConfig) -> None:
        super().__init__()
        self.alpha = config.alpha
        self.filter = FrequencyFilter(config)
        self.attention = CausalSelfAttention(config.dim, config.num_heads, config.attention_dropout)
        self.attention_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        hidden = config.dim * config.ffn_multiplier
        self.ffn = nn.Sequential(
            nn.Linear(config.dim, hidden), nn.GELU(), nn.Linear(hidden, config.dim)
        )
        self.ffn_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor, keep: torch.Tensor, last_only: bool = False
    ) -> torch.Tensor:
        """x [B, W, D] (zero at padding), allowed [B, 1, W, W], keep [B, W, 1] -> [B, W, D];
        with `last_only`, the last position only (its filter and keys see every position):
        [B, 1, D]."""
        dsp = self.filter(x, last_only)
        residual, keep = (x[:, -1:], keep[:, -1:]) if last_only else (x, keep)
        attended = self.attention(x, allowed, last_only)
        gsp = self.attention_norm(residual + self.dropout(attended))
        mixed = self.alpha * dsp + (1.0 - self.alpha) * gsp
        out: torch.Tensor = self.ffn_norm(mixed + self.dropout(self.ffn(mixed)))
        return out * keep  # padding rows back to zero: the next filter must not see them


class BSARec(SequentialEncoder):
    causal = False  # the filter mixes the whole window (see the module docstring)

    def __init__(self, config: BSARecConfig) -> None:
        super().__init__()
        self.config = config
        self.item_embedding = ItemEmbedding.for_model(config)
        # Row p is the position p steps before the most recent item (row 0 = most recent),
        # the reference's left-to-right index of a full window, relabelled.
        self.position_embedding = nn.Embedding(config.max_length, config.dim)
        self.embedding_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.embedding_dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(BSARecBlock(config) for _ in range(config.num_blocks))
        self.apply(partial(normal_init, std=config.init_std))  # the reference's init

    def forward(
        self,
        input_ids: torch.Tensor,
        timestamps: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """[B, L] left-padded ids -> [B, L, D] hidden states (zero at padding); with
        `last_only`, [B, 1, D]. Only the last position is a user vector; inner positions have
        seen the items after them.

        `timestamps` is accepted for interface compatibility and ignored.
        """
        del timestamps
        valid, keep, positions = window_layout(input_ids, self.config.max_length, "bsarec")
        x = self.item_embedding(input_ids) + self.position_embedding(positions)  # [B, L, D]
        x = self.embedding_dropout(self.embedding_norm(x)) * keep  # [B, L, D]
        allowed = causal_attention_mask(valid)  # [B, 1, L, L], as the reference's causal mask
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            # Every block but the last must give every position: the next filter reads them.
            x = block(x, allowed, keep, last_only and index == last)  # [B, L or 1, D]
        out: torch.Tensor = x
        return out
