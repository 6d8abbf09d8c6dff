"""Integer product of two activations (``x * gate``, Citrinet's squeeze-excite,
a Conformer's gates): ``clamp(round_half_up(a * b * m / 2**s))``.

The int64 product of the two integer inputs is at the real scale ``S_a * S_b``
(the spec's ``product_scale``); one dyadic pair takes it to the observed output
scale, so the only rounding is the last one. Shapes broadcast as in ``aten.mul``
(``[B, C, T] * [B, C, 1]``). For int8 x int16 inputs and ``m < 2**31`` the
product times ``m`` stays below 2**53.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qpipe.ir.opspec import OpKind, ScaleRule, qpipe_op
from qpipe.ir.ops.kernels import dtype_for_range, requant_reference


@qpipe_op(
    "mul_requant",
    kind=OpKind.REQUANTIZE,
    scale_rule=ScaleRule.OBSERVED,
    inputs=("a", "b"),
    multipliers=("m",),
    shift="s",
    clamp=("lo", "hi"),
    out_bits="bits",
    product_scale=lambda in_scales, v: in_scales[0] * in_scales[1],
)
def mul_requant(a: Tensor, b: Tensor, m: Tensor, s: Tensor, lo: int, hi: int, bits: int) -> Tensor:
    """Product of two integer tensors, requantized by one dyadic pair: ``(a*b*m + 2**(s-1)) >> s``, clamped."""
    acc = a.to(torch.int64) * b.to(torch.int64)
    return requant_reference(acc, m, s, 0, lo, hi).to(dtype_for_range(bits, lo, hi))


@mul_requant.register_fake
def _(a, b, m, s, lo, hi, bits):
    return torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=dtype_for_range(bits, lo, hi), device=a.device)
