"""Integer softmax over one dimension (I-BERT's i-softmax on qpipe's base-2 i-exp).

``softmax_int(x, dim, m, s, bits)``:

1. ``d = x - max(x, dim)``: an integer max-subtraction, so every ``d <= 0``;
2. ``e = exp_fixed(d, m, s)``: exp in Q20 (see :mod:`qpipe.ir.ops.iexp`; ``(m, s)``
   is the dyadic pair of ``S_x * log2(e) * 2**20``);
3. ``out = round_half_up(e * H / sum(e))`` with ``H = 2**(bits-1) - 1``, by exact
   integer division: ``floor((2 e H + sum) / (2 sum))``.

The output is at the *fixed* scale ``1 / H`` (int8: 1/127, so 1.0 is exactly
127; int16: 1/32767), whatever the input's scale: the verifier checks the qtype
against it. Values lie in ``[0, H]``. The input may be up to 32 bits wide (the
lowering narrows ``m`` so that ``d * m`` fits int64); sums of up to 2**30 Q20
terms are exact in int64.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qpipe.ir.opspec import OpKind, ScaleRule, qpipe_op
from qpipe.ir.ops.iexp import exp_fixed
from qpipe.ir.ops.kernels import dtype_for_bits


def unit_scale(bits: int) -> float:
    """The fixed output scale of a probability (softmax, sigmoid) at ``bits``: 1 / (2**(bits-1) - 1)."""
    return 1.0 / ((1 << (int(bits) - 1)) - 1)


def divide_half_up(num: Tensor, den: Tensor) -> Tensor:
    """``floor(num / den + 1/2)`` for int64 ``num >= 0`` and ``den > 0``, exactly."""
    return torch.div(2 * num + den, 2 * den, rounding_mode="floor")


@qpipe_op(
    "softmax_int",
    kind=OpKind.NONLINEARITY,
    scale_rule=ScaleRule.FIXED,
    inputs=("x",),
    out_bits="bits",
    fixed_scale=lambda v: unit_scale(v["bits"]),
)
def softmax_int(x: Tensor, dim: int, m: int, s: int, bits: int) -> Tensor:
    """Integer softmax over ``dim``: integer max-subtraction, Q20 i-exp, exact division; scale 1/(2**(bits-1)-1)."""
    x = x.to(torch.int64)
    d = x - x.amax(dim=dim, keepdim=True)
    e = exp_fixed(d, m, s)
    total = e.sum(dim=dim, keepdim=True)  # >= 2**20: the maximum contributes exp(0) = 1.0
    h = (1 << (bits - 1)) - 1
    return divide_half_up(e * h, total).to(dtype_for_bits(bits))


@softmax_int.register_fake
def _(x, dim, m, s, bits):
    return torch.empty_like(x, dtype=dtype_for_bits(bits))
