"""The input quantizer (the one float -> integer boundary of the graph) and its inverse."""
from __future__ import annotations

import torch
from torch import Tensor

from qpipe.ir.opspec import OpKind, ScaleRule, qpipe_op
from qpipe.ir.ops.kernels import div_round_half_up, dtype_for_bits


@qpipe_op("quantize", kind=OpKind.QUANTIZE, scale_rule=ScaleRule.ARGUMENT, scale_arg="scale", out_bits="bits")
def quantize(x: Tensor, scale: float, bits: int) -> Tensor:
    """Symmetric per-tensor quantizer: ``clamp(floor(x / scale + 1/2))``, exact in the float64 values."""
    hi = (1 << (bits - 1)) - 1
    q = div_round_half_up(x, scale).clamp(-hi, hi)
    return q.to(dtype_for_bits(bits))


@quantize.register_fake
def _(x, scale, bits):
    return torch.empty_like(x, dtype=dtype_for_bits(bits))


@torch.library.custom_op("qpipe::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: float) -> Tensor:
    """Integer tensor back to float32 (used outside the integer region only)."""
    return (q.to(torch.float64) * scale).to(torch.float32)


@dequantize.register_fake
def _(q, scale):
    return torch.empty_like(q, dtype=torch.float32)
