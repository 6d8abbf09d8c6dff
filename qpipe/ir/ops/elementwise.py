"""Elementwise integer ops of the Conformer: multiplication by constants, masking, padding.

``scale_rq`` multiplies by an integer constant ``w`` (one value, or one per
channel) whose real scale says what it stands for, adds a bias, and requantizes:
a multiplication or division by a real constant ``c`` is ``w = sign(c)`` at
scale ``|c|`` (so the dyadic pair carries ``S_x * |c| / S_out`` and nothing is
rounded but the output), LayerNorm's ``gamma``/``beta`` is ``w = sign(gamma)`` at
scale ``|gamma|`` per channel with ``beta`` in the bias. The verifier checks its
pair like a weighted op's.

``masked_fill_int`` and ``pad_int`` write one integer (the integer image of the
float fill value: 0 for 0.0, the range's minimum for -10000) and keep the
input's scale.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from qpipe.ir.opspec import OpKind, ScaleRule, qpipe_op
from qpipe.ir.ops.kernels import broadcast_channel, dtype_for_range, round_shift


def scale_reference(x: Tensor, w: Tensor, bias: Optional[Tensor], m: Tensor, s: Tensor, channel_dim: int,
                    lo: int, hi: int) -> Tensor:
    """``clamp(round_half_up(((x * w + bias) * m) / 2**s), lo, hi)`` in int64, ``w``/``bias``/``m``/``s`` per channel."""
    ndim = x.dim()
    cd = channel_dim % ndim if ndim else 0
    acc = x.to(torch.int64) * broadcast_channel(w.to(torch.int64), ndim, cd)
    if bias is not None:
        acc = acc + broadcast_channel(bias.to(torch.int64), ndim, cd)
    prod = acc * broadcast_channel(m.to(torch.int64), ndim, cd)
    return round_shift(prod, broadcast_channel(s.to(torch.int64), ndim, cd)).clamp(lo, hi)


@qpipe_op(
    "scale_rq",
    kind=OpKind.REQUANTIZE,
    scale_rule=ScaleRule.OBSERVED,
    inputs=("x",),
    weight="w",
    bias="bias",
    multipliers=("m",),
    shift="s",
    clamp=("lo", "hi"),
    out_bits="bits",
    channel_dim="channel_dim",
)
def scale_rq(x: Tensor, w: Tensor, bias: Optional[Tensor], m: Tensor, s: Tensor, channel_dim: int, lo: int, hi: int,
             bits: int) -> Tensor:
    """Multiply by an integer constant (per channel), add a bias, dyadic requant + clamp."""
    return scale_reference(x, w, bias, m, s, channel_dim, lo, hi).to(dtype_for_range(bits, lo, hi))


@scale_rq.register_fake
def _(x, w, bias, m, s, channel_dim, lo, hi, bits):
    return torch.empty_like(x, dtype=dtype_for_range(bits, lo, hi))


@qpipe_op("masked_fill_int", kind=OpKind.ELEMENTWISE, scale_rule=ScaleRule.INHERITED, inputs=("x",))
def masked_fill_int(x: Tensor, mask: Tensor, value: int) -> Tensor:
    """Where ``mask`` (bool, broadcast) is true the integer ``value``, else ``x``; the scale is x's."""
    return torch.where(mask, torch.tensor(int(value), dtype=x.dtype), x)


@masked_fill_int.register_fake
def _(x, mask, value):
    return torch.empty_like(x)


@qpipe_op("pad_int", kind=OpKind.LAYOUT, scale_rule=ScaleRule.INHERITED, inputs=("x",))
def pad_int(x: Tensor, pad: Sequence[int], value: int) -> Tensor:
    """Constant padding (``aten.pad`` order: last axis first) with the integer ``value``; the scale is x's."""
    return torch.nn.functional.pad(x, list(pad), mode="constant", value=int(value))


@pad_int.register_fake
def _(x, pad, value):
    import torch._refs  # aten's fake pad reads the sizes as ints (a symbolic time axis would specialize)

    return torch._refs.constant_pad_nd(x, list(pad), 0)
