"""Integer codes for float tensors: row-wise affine (tables) and per-channel symmetric (weights).

Row-wise affine, for embedding tables [R, D]: each row gets a scale and an offset so that its
codes span its own range [min, max]::

    scale  = (max - min) / (2^bits - 1)
    offset = min + 2^(bits-1) * scale               (the value of code 0)
    code   = clamp(round((x - offset) / scale), -2^(bits-1), 2^(bits-1) - 1)
    x'     = code * scale + offset                  |x - x'| <= scale / 2

8 bits store int8 codes [R, D]; 4 bits store two codes per byte, uint8 [R, ceil(D / 2)] (low
nibble = even column, high nibble = odd column, each code + 8). A constant row (max == min) has
scale 0 and decodes exactly; a zero row (padding) decodes to exact zeros.

Per-channel symmetric, for Linear weights [out, in]: ``scale = max|w_row| / 127``, int8 codes in
[-127, 127], ``w' = code * scale`` (zeros stay exactly zero, so magnitude pruning survives).
"""

from __future__ import annotations

import torch

from recloop.errors import ConfigError

ROW_BITS = (8, 4)


def _check_bits(bits: int) -> None:
    if bits not in ROW_BITS:
        raise ConfigError(f"row quantization supports {ROW_BITS} bits, got {bits!r}")


def code_columns(dim: int, bits: int) -> int:
    """Columns of the stored code matrix for rows of `dim` values."""
    _check_bits(bits)
    return dim if bits == 8 else (dim + 1) // 2


def quantize_rows(
    table: torch.Tensor, bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale [R], offset [R]) of a float table [R, D] (see the module docstring)."""
    _check_bits(bits)
    if table.ndim != 2 or not table.dtype.is_floating_point:
        raise ConfigError(f"quantize_rows needs a 2-D float table, got {table.dtype} {table.shape}")
    x = table.detach().float()
    low, high = x.min(dim=1).values, x.max(dim=1).values  # [R], [R]
    half = 2 ** (bits - 1)
    scale = (high - low) / (2**bits - 1)  # [R]
    offset = low + half * scale  # [R]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((x - offset.unsqueeze(1)) / safe.unsqueeze(1)).clamp_(-half, half - 1)
    # A constant row: every value equals `low`; code 0 decodes to offset == low exactly.
    codes = torch.where(scale.unsqueeze(1) > 0, codes, torch.zeros_like(codes))
    codes_int = codes.to(torch.int8)  # [R, D]
    if bits == 4:
        codes_int = pack_int4(codes_int)  # [R, ceil(D / 2)]
    return codes_int, scale, offset


def dequantize_rows(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, dim: int
) -> torch.Tensor:
    """Float rows [..., dim] from codes [..., C] and their scale, offset [...]."""
    values = (unpack_int4(codes, dim) if bits == 4 else codes).float()  # [..., dim]
    return values * scale.unsqueeze(-1) + offset.unsqueeze(-1)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], [..., D] -> uint8 [..., ceil(D / 2)], two codes per byte."""
    shifted = (codes.to(torch.int16) + 8).to(torch.uint8)  # [..., D] in 0..15
    if shifted.shape[-1] % 2:
        shifted = torch.nn.functional.pad(shifted, (0, 1), value=8)  # a zero code
    low, high = shifted[..., 0::2], shifted[..., 1::2]
    return low | (high << 4)


def unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """uint8 [..., C] -> int32 codes in [-8, 7], [..., dim] (arithmetic only, ONNX-friendly)."""
    byte = packed.to(torch.int32)  # [..., C]
    high = torch.div(byte, 16, rounding_mode="floor")
    low = byte - 16 * high
    both = torch.stack((low, high), dim=-1).flatten(-2)  # [..., 2C]
    return both[..., :dim] - 8


def quantize_channels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [out, in], scale [out]) of a Linear weight, symmetric per output channel."""
    w = weight.detach().float()
    scale = w.abs().max(dim=1).values / 127.0  # [out]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(w / safe.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_channels(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.unsqueeze(1)
