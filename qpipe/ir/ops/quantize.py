"""The input quantizer (the one float -> integer boundary of the graph) and its inverse.

The quantizer is ONNX's ``QuantizeLinear`` exactly: the float32 quotient
``x / scale`` (IEEE, correctly rounded), rounded half to even, saturated to the
full signed range ``[-2**(bits-1), 2**(bits-1) - 1]``. That is what every
runtime's QuantizeLinear computes (ONNX Runtime's MLAS divides; it does not
multiply by a reciprocal), so a backend can hand the input to its own fused
quantizer and still produce the reference's integers. ``scale`` is a float32
value (the lowering rounds it so) and the integer program downstream uses that
same value.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qpipe.ir.opspec import OpKind, ScaleRule, qpipe_op
from qpipe.ir.ops.kernels import dtype_for_bits


@qpipe_op("quantize", kind=OpKind.QUANTIZE, scale_rule=ScaleRule.ARGUMENT, scale_arg="scale", out_bits="bits")
def quantize(x: Tensor, scale: float, bits: int) -> Tensor:
    """Per-tensor quantizer ``clamp(round_half_even(fl32(x / scale)))`` (ONNX QuantizeLinear, zero point 0)."""
    return quantize_by(x, torch.tensor(scale, dtype=torch.float32, device=x.device), bits)


def quantize_by(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """:func:`quantize` with the scale as a float32 tensor on ``x``'s device: a backend that keeps it there
    makes no host-to-device copy per call (which a CUDA graph could not capture)."""
    hi = (1 << (bits - 1)) - 1
    return torch.round(x.to(torch.float32) / scale).clamp(-hi - 1, hi).to(dtype_for_bits(bits))


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
