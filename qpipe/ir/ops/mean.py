"""Integer mean over dimensions (Citrinet's squeeze-excite pools over time).

``mean_int(x, count, dim, keepdim, m, s, lo, hi, bits)``: the exact int64 sum over
``dim``, divided by the number of terms and requantized to the observed output
scale in one exact rounding: ``floor((2 sum m + c 2**s) / (2 c 2**s))`` is
``round_half_up(sum * m / (c * 2**s))``. ``count`` is that number ``c``: NeMo's
masked squeeze-excite divides by the number of valid frames, an int64 tensor the
graph computes from the lengths (``mask.sum(-1)``), so it is passed in as is;
``None`` divides by the size of the reduced dimensions (a plain ``mean``). The
division is integer division, the mean's real scale before requantization is
the input's (``product_scale``), and ``(m, s)`` is the dyadic pair of
``S_x / S_out``. The lowering keeps ``s <= 45`` so that ``c * 2**(s+1)`` fits
int64 for counts below 2**16.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from qpipe.ir.opspec import OpKind, ScaleRule, qpipe_op
from qpipe.ir.ops.kernels import dtype_for_range

MAX_MEAN_SHIFT = 45


def _reduced_count(x: Tensor, dim: Sequence[int]) -> int:
    return math.prod(int(x.shape[d]) for d in dim) if dim else x.numel()


@qpipe_op(
    "mean_int",
    kind=OpKind.REQUANTIZE,
    scale_rule=ScaleRule.OBSERVED,
    inputs=("x",),
    multipliers=("m",),
    shift="s",
    clamp=("lo", "hi"),
    out_bits="bits",
    product_scale=lambda in_scales, v: in_scales[0],
)
def mean_int(
    x: Tensor, count: Optional[Tensor], dim: Sequence[int], keepdim: bool, m: Tensor, s: Tensor, lo: int, hi: int, bits: int
) -> Tensor:
    """Integer mean over ``dim`` (divided by ``count``, or the reduced size), requantized by (m, s), half up."""
    dims = list(dim) if dim else list(range(x.dim()))
    total = x.to(torch.int64).sum(dim=dims, keepdim=keepdim)
    if count is None:
        c = torch.tensor(_reduced_count(x, dims), dtype=torch.int64, device=x.device)
    else:
        c = count.to(torch.int64)
    mm, ss = m.to(torch.int64).reshape(()), s.to(torch.int64).reshape(())
    den = c * torch.bitwise_left_shift(torch.ones_like(ss), ss)
    q = torch.div(2 * total * mm + den, 2 * den, rounding_mode="floor")
    return q.clamp(lo, hi).to(dtype_for_range(bits, lo, hi))


@mean_int.register_fake
def _(x, count, dim, keepdim, m, s, lo, hi, bits):
    dims = list(dim) if dim else list(range(x.dim()))
    return x.to(torch.float32).sum(dim=dims, keepdim=keepdim).to(dtype_for_range(bits, lo, hi))
