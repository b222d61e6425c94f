"""Dropout whose mask is cheap to draw on CPU.

torch's CPU dropout draws its mask with `bernoulli_`, one generator call per element: in a
profile of BSARec training on Beauty (dim 64, dropout 0.5 at nine places per step) it was a
quarter of the step. Here the mask comes from 16-bit slices of 64-bit integers from the same
generator (`torch.randint`), four elements per call, several times cheaper here. The
keep probability is 1 - p rounded to a multiple of 1/65536 (exact for p = 0.5, 0.25, ...;
off by at most 8e-6 otherwise). Runs stay reproducible: the draws come from torch's seeded
generator, whose state checkpoints save. On other devices this is `F.dropout`, which is fused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16  # values of one 16-bit slice


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero each element of x with probability p and scale the rest by 1 / (1 - p) (only when
    `training`); the same contract as `F.dropout`."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    count = x.numel()
    words = torch.randint(
        -(1 << 63), (1 << 63) - 1, ((count + 3) // 4,), dtype=torch.int64, device=x.device
    )
    uniform = words.view(torch.int16)[:count].view(x.shape)  # uniform over [-2^15, 2^15)
    # Keep when the slice is >= threshold: (2^15 - threshold) / 2^16 = 1 - p of the values.
    threshold = round(p * _LEVELS) - _LEVELS // 2
    keep = (uniform >= threshold).to(x.dtype).mul_(1.0 / (1.0 - p))  # [*x.shape]
    return x * keep


class Dropout(nn.Module):
    """`nn.Dropout` with the cheaper CPU mask of `dropout` (no parameters, no state)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p!r}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
