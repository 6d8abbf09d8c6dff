"""Integer linear layers: the accumulator alone, and fused with its requantization."""
from __future__ import annotations

from typing import Optional

from torch import Tensor
import torch

from qpipe.ir.opspec import OpKind, ScaleRule, qpipe_op
from qpipe.ir.ops.kernels import dtype_for_bits, dtype_for_range, exact_float_dtype, requantize


def linear_accumulate(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    ft = exact_float_dtype(x, w, w.shape[1])
    acc = torch.matmul(x.to(ft), w.to(ft).t()).to(torch.int64)
    if bias is not None:
        acc = acc + bias.to(torch.int64)
    return acc


@qpipe_op(
    "linear_acc",
    kind=OpKind.ACCUMULATE,
    scale_rule=ScaleRule.PRODUCT,
    inputs=("x",),
    weight="w",
    bias="bias",
    out_bits="acc_bits",
    channel_dim=-1,
    fused="linear_rq",
)
def linear_acc(x: Tensor, w: Tensor, bias: Optional[Tensor], acc_bits: int) -> Tensor:
    """Integer ``x @ w.T + bias`` over the last dimension; exact accumulator."""
    return linear_accumulate(x, w, bias).to(dtype_for_bits(acc_bits))


@linear_acc.register_fake
def _(x, w, bias, acc_bits):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=dtype_for_bits(acc_bits))


@qpipe_op(
    "linear_rq",
    kind=OpKind.REQUANTIZE,
    scale_rule=ScaleRule.OBSERVED,
    inputs=("x",),
    weight="w",
    bias="bias",
    multipliers=("m",),
    shift="s",
    clamp=("lo", "hi"),
    out_bits="bits",
    channel_dim=-1,
)
def linear_rq(x: Tensor, w: Tensor, bias: Optional[Tensor], m: Tensor, s: Tensor, lo: int, hi: int, bits: int,
              f32: bool = False) -> Tensor:
    """Integer linear + per-output-feature requant (dyadic, or float32-faithful with ``f32``) + clamp -> int8."""
    acc = linear_accumulate(x, w, bias)
    return requantize(acc, m, s, acc.dim() - 1, lo, hi, f32).to(dtype_for_range(bits, lo, hi))


@linear_rq.register_fake
def _(x, w, bias, m, s, lo, hi, bits, f32=False):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=dtype_for_range(bits, lo, hi))
