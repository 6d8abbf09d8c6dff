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

``masked_softmax_int(x, mask, dim, m, s, bits)`` is attention's
``softmax(masked_fill(x, mask, -10000))`` with the mask inside: where ``mask``
(bool, broadcast to ``x``) is true the probability is exactly 0, and every other
entry of a row is ``softmax_int`` of that row's unmasked entries alone (the max
and the sum run over them only). A row whose every entry is masked is uniform,
as float's softmax of a row of equal fill values is. Writing the fill's integer
image instead (``masked_fill_int`` of the code range's minimum, then
``softmax_int``) leaves masked entries ``exp(S_x * (lo - max))`` of the mass,
which is not small at a small score scale: padded batches came out wrong.
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


@qpipe_op(
    "masked_softmax_int",
    kind=OpKind.NONLINEARITY,
    scale_rule=ScaleRule.FIXED,
    inputs=("x",),
    out_bits="bits",
    fixed_scale=lambda v: unit_scale(v["bits"]),
)
def masked_softmax_int(x: Tensor, mask: Tensor, dim: int, m: int, s: int, bits: int) -> Tensor:
    """Integer softmax over ``dim`` of the entries where ``mask`` is false; masked entries exactly 0 (all-masked rows uniform)."""
    x = x.to(torch.int64)
    mask = torch.broadcast_to(mask.to(torch.bool), x.shape)
    every = mask.all(dim=dim, keepdim=True)  # a row with nothing left: uniform, as float's row of equal fills
    drop = mask & ~every
    low = torch.iinfo(torch.int64).min
    top = torch.where(drop, torch.full_like(x, low), x).amax(dim=dim, keepdim=True)
    top = torch.where(every, torch.zeros_like(top), top)
    d = torch.where(drop | every, torch.zeros_like(x), x - top)
    e = torch.where(drop, torch.zeros_like(x), exp_fixed(d, m, s))
    total = e.sum(dim=dim, keepdim=True)  # >= 2**20: the row's maximum (or a fully masked row's first) is exp(0)
    h = (1 << (bits - 1)) - 1
    return divide_half_up(e * h, total).to(dtype_for_bits(bits))


@masked_softmax_int.register_fake
def _(x, mask, dim, m, s, bits):
    return torch.empty_like(x, dtype=dtype_for_bits(bits))
