"""The float32-faithful requantization (``f32=True``) as float32 arithmetic, on CPU or GPU.

The reference defines it in integers (``qpipe.ir.ops.kernels.requant_f32_reference``) as
exactly what float32 hardware computes: ``round_half_even(fl32(fl32(acc) * M))``. Here it
*is* that float32 arithmetic: the accumulator (with its bias, summed exactly) converted to
float32 (round to nearest even), one float32 multiply, ``torch.round`` (half to even).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def f32_multipliers(m: Tensor, s: Tensor, channels: int, device=None) -> Tensor:
    """Per channel, the float32 multiplier ``m * 2**-s`` (exact: ``m < 2**24``)."""
    m = m.to(torch.float64).reshape(-1).expand(channels)
    s = s.to(torch.float64).reshape(-1).expand(channels)
    return (m * torch.pow(2.0, -s)).to(torch.float32).contiguous().to(device)


def requant_f32(acc: Tensor, bias: Optional[Tensor], mult: Tensor, lo: int, hi: int) -> Tensor:
    """``clamp(round(fl32(acc + bias) * mult), lo, hi)`` of an (N, C) accumulator, as float32 codes.

    ``acc``: integers (int32 / int64) or exact float32 integers; ``bias``: int64 (C) or empty."""
    has_bias = bias is not None and bias.numel() > 0
    if acc.dtype == torch.float32:
        v = (acc.to(torch.float64) + bias.to(torch.float64)).to(torch.float32) if has_bias else acc
    else:
        v = acc.to(torch.int64)
        v = (v + bias if has_bias else v).to(torch.float32)
    return torch.round(v * mult).clamp_(lo, hi)
