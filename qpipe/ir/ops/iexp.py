"""Integer exponent: the fixed-point core of softmax, sigmoid, SiLU and GLU.

I-BERT's i-exp splits ``exp(x) = 2**(-z) * exp(p)`` with integer ``z`` and a
second-order polynomial for ``exp(p)``; its coefficients and ``ln 2`` are
rounded *to the input's grid* (``floor(ln2 / S)``), which is exact enough for
a 32-bit accumulator but coarse for an int8 input (S = 0.1 makes ln 2 read 0.6).
Here the range reduction happens on a fine grid instead, in base 2 as I-ViT's
Shiftmax does:

1. ``t = round(x * m / 2**s)``: the input in log2 units, ``x * S * log2(e)``,
   as a Q20 fixed-point number (``EXP_FRAC`` fractional bits). ``(m, s)`` is the
   dyadic pair of ``S * log2(e) * 2**20``, computed at lowering time from the
   input's scale; nothing else depends on the scale.
2. ``k = t >> 20`` (floor), ``f = t - k * 2**20`` in ``[0, 2**20)``.
3. ``2**(f / 2**20) ~= P(f)``: a quartic with integer Q20 coefficients
   (``EXP2_POLY``, a near-minimax fit on [0, 1) with P(0) = 1 exactly, max
   relative error 4e-6 after rounding the coefficients),
   evaluated by Horner with a round-half-up shift after each product.
4. ``e = round(P(f) / 2**(-k))``: the shift by the integer part.

The result is ``exp(x * S)`` at the fixed scale ``2**-20`` (1.0 is 2**20): Q20
rather than Q16 so that a 16-bit softmax or sigmoid output still rounds once,
at its own last step.
Inputs must be <= 0 (softmax subtracts the maximum first, sigmoid takes
``-|x|``); a positive ``t`` is clamped to 0, so exp saturates at 1.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from qpipe.ir.opspec import OpKind, ScaleRule, qpipe_op
from qpipe.ir.ops.kernels import dtype_for_bits, round_shift

EXP_FRAC = 20
ONE = 1 << EXP_FRAC
# 2**f ~= 1 + c1 f + c2 f**2 + c3 f**3 + c4 f**4 on [0, 1), coefficients in Q20 (c0 = 1.0 exactly)
EXP2_POLY = (ONE, 726683, 253174, 54474, 14241)
MAX_SHIFT = 62
LOG2E = 1.0 / math.log(2.0)


def exp_input_ratio(scale: float) -> float:
    """The real ratio the dyadic ``(m, s)`` of an exp stage approximates: ``S * log2(e) * 2**20``."""
    return float(scale) * LOG2E * ONE


def exp_m_bits(in_bits: int) -> int:
    """Multiplier width so that ``x * m`` fits int64 for an ``in_bits``-bit input (and its difference)."""
    return max(8, min(31, 61 - (in_bits + 1)))


def exp2_fixed(t: Tensor) -> Tensor:
    """``round(2**(t / 2**20) * 2**20)`` (up to the polynomial) for int64 ``t <= 0`` in Q20."""
    t = t.to(torch.int64).clamp(max=0)
    k = torch.bitwise_right_shift(t, EXP_FRAC)  # floor(t / 2**20) <= 0
    f = t - torch.bitwise_left_shift(k, EXP_FRAC)
    p = torch.full_like(f, EXP2_POLY[-1])
    for c in reversed(EXP2_POLY[:-1]):  # Horner, one round-half-up shift per product
        p = round_shift(p * f, EXP_FRAC) + c
    return round_shift(p, (-k).clamp(max=MAX_SHIFT))


def exp_fixed(x: Tensor, m: int, s: int) -> Tensor:
    """``exp(x * S)`` in Q20 for integer ``x <= 0``; ``(m, s)`` from :func:`exp_input_ratio`."""
    t = round_shift(x.to(torch.int64) * int(m), int(s))
    return exp2_fixed(t)


@qpipe_op(
    "exp_int",
    kind=OpKind.NONLINEARITY,
    scale_rule=ScaleRule.FIXED,
    inputs=("x",),
    out_bits="bits",
    fixed_scale=lambda v: 2.0 ** -EXP_FRAC,
)
def exp_int(x: Tensor, m: int, s: int, bits: int) -> Tensor:
    """Integer exp of ``x <= 0`` at the fixed scale 2**-20 (base-2 range reduction, quartic for 2**f)."""
    return exp_fixed(x, m, s).to(dtype_for_bits(bits))


@exp_int.register_fake
def _(x, m, s, bits):
    return torch.empty_like(x, dtype=dtype_for_bits(bits))
