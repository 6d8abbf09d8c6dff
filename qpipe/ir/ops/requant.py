"""Requantization by dyadic pairs, the residual add, and integer clamping.

Every dyadic pair travels the same way: ``m`` and ``s`` are int64 tensor
constants (one value, or one per output channel), never Python ints.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qpipe.ir.opspec import OpKind, ScaleRule, qpipe_op
from qpipe.ir.ops.kernels import dtype_for_range, requantize, round_shift


@qpipe_op(
    "requant",
    kind=OpKind.REQUANTIZE,
    scale_rule=ScaleRule.OBSERVED,
    inputs=("acc",),
    multipliers=("m",),
    shift="s",
    clamp=("lo", "hi"),
    out_bits="bits",
    channel_dim="channel_dim",
)
def requant(acc: Tensor, m: Tensor, s: Tensor, channel_dim: int, lo: int, hi: int, bits: int, f32: bool = False) -> Tensor:
    """Dyadic requantization ``clamp((acc*m + 2**(s-1)) >> s, lo, hi)``; m, s per channel or scalar.

    ``f32``: ``m * 2**-s`` is a float32 multiplier and the result is float32 arithmetic's,
    ``round_half_even(fl32(fl32(acc) * M))`` (computed in integers: ``kernels.requant_f32_reference``)."""
    return requantize(acc, m, s, channel_dim, lo, hi, f32).to(dtype_for_range(bits, lo, hi))


@requant.register_fake
def _(acc, m, s, channel_dim, lo, hi, bits, f32=False):
    return torch.empty_like(acc, dtype=dtype_for_range(bits, lo, hi))


@qpipe_op(
    "add_requant",
    kind=OpKind.REQUANTIZE,
    scale_rule=ScaleRule.OBSERVED,
    inputs=("a", "b"),
    multipliers=("ma", "mb"),
    shift="s",
    clamp=("lo", "hi"),
    out_bits="bits",
)
def add_requant(a: Tensor, b: Tensor, ma: Tensor, mb: Tensor, s: Tensor, lo: int, hi: int, bits: int) -> Tensor:
    """Residual add of two integer tensors with different scales: ``(a*ma + b*mb) >> s``, one shared shift."""
    v = a.to(torch.int64) * ma.to(torch.int64) + b.to(torch.int64) * mb.to(torch.int64)
    return round_shift(v, s).clamp(lo, hi).to(dtype_for_range(bits, lo, hi))


@add_requant.register_fake
def _(a, b, ma, mb, s, lo, hi, bits):
    return torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=dtype_for_range(bits, lo, hi), device=a.device)


@qpipe_op("clamp_int", kind=OpKind.ELEMENTWISE, scale_rule=ScaleRule.INHERITED, inputs=("x",), clamp=("lo", "hi"))
def clamp_int(x: Tensor, lo: int, hi: int) -> Tensor:
    """ReLU / hardtanh on an integer tensor at an unchanged scale."""
    return x.clamp(lo, hi)


@clamp_int.register_fake
def _(x, lo, hi):
    return torch.empty_like(x)
