"""Integer 1-D and 2-D convolutions: the accumulator alone, and fused with its requantization."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from qpipe.ir.opspec import OpKind, ScaleRule, qpipe_op
from qpipe.ir.ops.kernels import dtype_for_bits, dtype_for_range, exact_float_dtype, requantize

_CONV_ROLES = dict(inputs=("x",), weight="w", bias="bias", channel_dim=1)
_RQ_ROLES = dict(multipliers=("m",), shift="s", clamp=("lo", "hi"), out_bits="bits")

_CONV_FN = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d}


def conv_accumulate(x: Tensor, w: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int) -> Tensor:
    """The exact integer accumulator of a 1-D or 2-D convolution (int64), bias added per channel."""
    ft = exact_float_dtype(x, w, w[0].numel())
    acc = _CONV_FN[w.dim()](x.to(ft), w.to(ft), None, list(stride), list(padding), list(dilation), groups).to(torch.int64)
    if bias is not None:
        acc = acc + bias.to(torch.int64).reshape(1, -1, *([1] * (acc.dim() - 2)))
    return acc


def _conv_fake(x: Tensor, w: Tensor, stride, padding, dilation, groups: int) -> Tensor:
    return _CONV_FN[w.dim()](
        x.to(torch.float32), w.to(torch.float32), None, list(stride), list(padding), list(dilation), groups
    )


def _define_conv(dims: int) -> tuple:
    """``conv{dims}d_acc`` and ``conv{dims}d_rq``: the same integer steps for 1-D and 2-D (NCHW) convolutions."""
    name = f"conv{dims}d"

    def acc(
        x: Tensor,
        w: Tensor,
        bias: Optional[Tensor],
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
        acc_bits: int,
    ) -> Tensor:
        return conv_accumulate(x, w, bias, stride, padding, dilation, groups).to(dtype_for_bits(acc_bits))

    acc.__doc__ = f"Integer {dims}-D convolution; returns the exact accumulator (bias at S_x*S_w)."
    acc_op = qpipe_op(f"{name}_acc", kind=OpKind.ACCUMULATE, scale_rule=ScaleRule.PRODUCT, out_bits="acc_bits",
                      fused=f"{name}_rq", **_CONV_ROLES)(acc)

    @acc_op.register_fake
    def _(x, w, bias, stride, padding, dilation, groups, acc_bits):
        return _conv_fake(x, w, stride, padding, dilation, groups).to(dtype_for_bits(acc_bits))

    def rq(
        x: Tensor,
        w: Tensor,
        bias: Optional[Tensor],
        m: Tensor,
        s: Tensor,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
        lo: int,
        hi: int,
        bits: int,
        f32: bool = False,
    ) -> Tensor:
        total = conv_accumulate(x, w, bias, stride, padding, dilation, groups)
        return requantize(total, m, s, 1, lo, hi, f32).to(dtype_for_range(bits, lo, hi))

    rq.__doc__ = (f"Integer conv{dims}d + per-channel requant (dyadic, or float32-faithful with ``f32``) + clamp "
                  "(ReLU) -> int8 / uint8.")
    rq_op = qpipe_op(f"{name}_rq", kind=OpKind.REQUANTIZE, scale_rule=ScaleRule.OBSERVED, **_CONV_ROLES, **_RQ_ROLES)(rq)

    @rq_op.register_fake
    def _(x, w, bias, m, s, stride, padding, dilation, groups, lo, hi, bits, f32=False):
        return _conv_fake(x, w, stride, padding, dilation, groups).to(dtype_for_range(bits, lo, hi))

    return acc_op, rq_op


conv1d_acc, conv1d_rq = _define_conv(1)
conv2d_acc, conv2d_rq = _define_conv(2)  # NCHW: the Conformer's and Citrinet's striding subsampling
