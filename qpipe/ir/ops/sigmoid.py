"""Integer sigmoid, and the gates built on it: SiLU (``x * sigmoid(x)``) and GLU
(``a * sigmoid(b)`` of the two halves of one tensor).

Sigmoid is ``1 / (1 + exp(-x))``, computed on the integer exponent of
:mod:`qpipe.ir.ops.iexp` from ``e = exp(-|x| S)`` in Q20 (never overflowing):
``sigmoid(x) = 2**20 / (2**20 + e)`` for ``x >= 0`` and ``e / (2**20 + e)`` for
``x < 0``, then one exact round-half-up integer division to ``H`` steps.

* ``sigmoid_int``: output at the fixed scale ``1 / H``, ``H = 2**(bits-1) - 1``
  (int8: 1/127; int16 for a gate that multiplies another tensor, 1/32767).
* ``silu_int`` / ``glu_int``: the gate is kept at ``GATE_BITS`` internally (Q15),
  multiplied by the integer ``x`` (or the half ``a``) into an int64 accumulator
  at scale ``S_x * 2**-15``, and requantized by a dyadic ``(m, s)`` to the
  observed output scale (``ScaleRule.OBSERVED``; the verifier checks ``m 2**-s``
  against ``S_x 2**-15 / S_out``). One rounding at the end, not two.

``(m_e, s_e)`` in each op is the exp stage's dyadic pair of ``S_x log2(e) 2**20``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qpipe.ir.opspec import OpKind, ScaleRule, qpipe_op
from qpipe.ir.ops.iexp import ONE, exp_fixed
from qpipe.ir.ops.kernels import dtype_for_bits, dtype_for_range, requant_reference
from qpipe.ir.ops.softmax import divide_half_up, unit_scale

GATE_FRAC = 15  # the internal gate of SiLU and GLU: sigmoid in Q15 (1.0 is 32768)


def sigmoid_fixed(x: Tensor, m_e: int, s_e: int, steps: int) -> Tensor:
    """``round_half_up(sigmoid(x S) * steps)`` in int64 (``steps`` integer levels for 1.0)."""
    x = x.to(torch.int64)
    e = exp_fixed(-x.abs(), m_e, s_e)
    den = ONE + e
    num = torch.where(x >= 0, torch.full_like(e, ONE), e)
    return divide_half_up(num * steps, den)


def gate_product_scale(in_scale: float) -> float:
    """Real scale of ``x * gate`` before requantization (the verifier's and the lowering's ratio)."""
    return float(in_scale) * 2.0 ** -GATE_FRAC


_RQ = dict(multipliers=("m",), shift="s", clamp=("lo", "hi"), out_bits="bits")
_PRODUCT_SCALE = lambda in_scales, v: gate_product_scale(in_scales[0])  # noqa: E731


@qpipe_op(
    "sigmoid_int",
    kind=OpKind.NONLINEARITY,
    scale_rule=ScaleRule.FIXED,
    inputs=("x",),
    out_bits="bits",
    fixed_scale=lambda v: unit_scale(v["bits"]),
)
def sigmoid_int(x: Tensor, m_e: int, s_e: int, bits: int) -> Tensor:
    """Integer sigmoid at the fixed scale 1/(2**(bits-1)-1), values in [0, 2**(bits-1)-1]."""
    steps = (1 << (bits - 1)) - 1
    return sigmoid_fixed(x, m_e, s_e, steps).to(dtype_for_bits(bits))


@sigmoid_int.register_fake
def _(x, m_e, s_e, bits):
    return torch.empty_like(x, dtype=dtype_for_bits(bits))


@qpipe_op("silu_int", kind=OpKind.NONLINEARITY, scale_rule=ScaleRule.OBSERVED, inputs=("x",),
          product_scale=_PRODUCT_SCALE, **_RQ)
def silu_int(x: Tensor, m_e: int, s_e: int, m: Tensor, s: Tensor, lo: int, hi: int, bits: int) -> Tensor:
    """Integer SiLU ``x * sigmoid(x)``: Q15 gate, int64 product, dyadic requant to the observed scale."""
    acc = x.to(torch.int64) * sigmoid_fixed(x, m_e, s_e, 1 << GATE_FRAC)
    return requant_reference(acc, m, s, 0, lo, hi).to(dtype_for_range(bits, lo, hi))


@silu_int.register_fake
def _(x, m_e, s_e, m, s, lo, hi, bits):
    return torch.empty_like(x, dtype=dtype_for_range(bits, lo, hi))


@qpipe_op("glu_int", kind=OpKind.NONLINEARITY, scale_rule=ScaleRule.OBSERVED, inputs=("x",),
          product_scale=_PRODUCT_SCALE, **_RQ)
def glu_int(x: Tensor, dim: int, m_e: int, s_e: int, m: Tensor, s: Tensor, lo: int, hi: int, bits: int) -> Tensor:
    """Integer GLU over ``dim``: first half times the Q15 sigmoid of the second, dyadic requant."""
    a, b = x.chunk(2, dim=dim)
    acc = a.to(torch.int64) * sigmoid_fixed(b, m_e, s_e, 1 << GATE_FRAC)
    return requant_reference(acc, m, s, 0, lo, hi).to(dtype_for_range(bits, lo, hi))


@glu_int.register_fake
def _(x, dim, m_e, s_e, m, s, lo, hi, bits):
    a, _ = x.chunk(2, dim=dim)
    return torch.empty_like(a, dtype=dtype_for_range(bits, lo, hi))
