"""Integer exponent: the fixed-point core of softmax, sigmoid, SiLU and GLU.

I-BERT's i-exp splits ``exp(x) = 2**(-z) * exp(p)`` with integer ``z`` and a
second-order polynomial for ``exp(p)``; its coefficients and ``ln 2`` are
rounded *to the input's grid* (``floor(ln2 / S)``), which is exact enough for
a 32-bit accumulator but coarse for an int8 input (S = 0.1 makes ln 2 read 0.6).
Here the range reduction happens on a fine grid instead, in base 2 as I-ViT's
Shiftmax does:

1. ``t = round(x * m / 2**s)``: the input in log2 units, ``x * S * log2(e)``,
   as a Q16 fixed-point number (``EXP_FRAC`` fractional bits). ``(m, s)`` is the
   dyadic pair of ``S * log2(e) * 2**16``, computed at lowering time from the
   input's scale; nothing else depends on the scale.
2. ``k = t >> 16`` (floor), ``f = t - k * 2**16`` in ``[0, 2**16)``.
3. ``2**(f / 2**16) ~= P(f)``: a cubic with integer Q16 coefficients
   (``EXP2_POLY``, a near-minimax fit on [0, 1), max relative error 1.3e-4),
   evaluated by Horner with a round-half-up shift after each product.
4. ``e = round(P(f) / 2**(-k))``: the shift by the integer part.

The result is ``exp(x * S)`` at the fixed scale ``2**-16`` (1.0 is 65536).
Inputs must be <= 0 (softmax subtracts the maximum first, sigmoid takes
``-|x|``); a positive ``t`` is clamped to 0, so exp saturates at 1.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from qpipe.ir.opspec import OpKind, ScaleRule, qpipe_op
from qpipe.ir.ops.kernels import dtype_for_bits, round_shift

EXP_FRAC = 16
ONE = 1 << EXP_FRAC
# 2**f ~= 1 + c1 f + c2 f**2 + c3 f**3 on [0, 1), coefficients in Q16 (c0 = 1.0 exactly)
EXP2_POLY = (ONE, 45584, 14823, 5121)
MAX_SHIFT = 62
LOG2E = 1.0 / math.log(2.0)


def exp_input_ratio(scale: float) -> float:
    """The real ratio the dyadic ``(m, s)`` of an exp stage approximates: ``S * log2(e) * 2**16``."""
    return float(scale) * LOG2E * ONE


def exp_m_bits(in_bits: int) -> int:
    """Multiplier width so that ``x * m`` fits int64 for an ``in_bits``-bit input (and its difference)."""
    return max(8, min(31, 61 - (in_bits + 1)))


def exp2_fixed(t: Tensor) -> Tensor:
    """``round(2**(t / 2**16) * 2**16)`` (up to the polynomial) for int64 ``t <= 0`` in Q16."""
    t = t.to(torch.int64).clamp(max=0)
    k = torch.bitwise_right_shift(t, EXP_FRAC)  # floor(t / 2**16) <= 0
    f = t - torch.bitwise_left_shift(k, EXP_FRAC)
    c0, c1, c2, c3 = EXP2_POLY
    p = torch.full_like(f, c3)
    p = round_shift(p * f, EXP_FRAC) + c2
    p = round_shift(p * f, EXP_FRAC) + c1
    p = round_shift(p * f, EXP_FRAC) + c0
    return round_shift(p, (-k).clamp(max=MAX_SHIFT))


def exp_fixed(x: Tensor, m: int, s: int) -> Tensor:
    """``exp(x * S)`` in Q16 for integer ``x <= 0``; ``(m, s)`` from :func:`exp_input_ratio`."""
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
    """Integer exp of ``x <= 0`` at the fixed scale 2**-16 (base-2 range reduction, cubic for 2**f)."""
    return exp_fixed(x, m, s).to(dtype_for_bits(bits))


@exp_int.register_fake
def _(x, m, s, bits):
    return torch.empty_like(x, dtype=dtype_for_bits(bits))
