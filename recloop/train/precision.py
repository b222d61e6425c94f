"""Whether bf16 matmul operands pay on this machine.

On a CPU with native bf16 dot products (avx512_bf16 or AMX, which oneDNN reports as bf16
support) a large matmul runs several times faster with bf16 operands than in fp32 (a [384, 64]
x [64, 12,101] one, timed in a scratch script on this project's AMD EPYC). Without them oneDNN
emulates bf16 and the same matmul gets slower, so "auto" settings turn bf16 on only where it
is native; whether the casts around a matmul leave a gain is for each caller to measure.
CUDA devices with bf16 (Ampere and later) count as native.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import torch

Bf16Setting = bool | Literal["auto"]


@cache
def native_bf16(device: str = "cpu") -> bool:
    """True where bf16 matmuls run on native instructions on `device` ("cpu" or "cuda")."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def resolve_bf16(setting: Bf16Setting, device: str = "cpu") -> bool:
    """A config's `bf16` value ("auto", true or false) as the boolean to use on `device`."""
    return native_bf16(device) if setting == "auto" else bool(setting)
