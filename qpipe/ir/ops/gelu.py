"""Integer GELU (I-BERT's i-GELU) for models outside NeMo's ASR set.

``gelu(x) = x/2 * (1 + erf(x / sqrt 2))`` with I-BERT's second-order erf,
``erf(v) ~= sgn(v) * (a * (min(|v|, -b) + b)**2 + 1)``, ``a = -0.2888``,
``b = -1.769``. I-BERT rounds ``b`` and ``1/a`` onto the input's grid; here, as
for the exponent, the input is first taken to a Q16 grid, ``u = round(x * m_u /
2**s_u)`` with ``(m_u, s_u)`` the dyadic pair of ``S_x / sqrt(2) * 2**16``, and
the polynomial runs in Q16 with integer coefficients ``ERF_A``, ``ERF_B``. The
product ``x * (2**16 + erf_q16)`` is at scale ``S_x * 2**-17`` and one dyadic
pair takes it to the observed output scale. The approximation error is
I-BERT's polynomial's (measured in ``tools/bench/kernel_error.py``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from qpipe.ir.opspec import OpKind, ScaleRule, qpipe_op
from qpipe.ir.ops.kernels import dtype_for_range, requant_reference, round_shift

GELU_FRAC = 16
ONE = 1 << GELU_FRAC
ERF_A = round(-0.2888 * ONE)  # Q16
ERF_B = round(1.769 * ONE)  # Q16, the clip point -b


def gelu_input_ratio(scale: float) -> float:
    return float(scale) / math.sqrt(2.0) * ONE


def gelu_product_scale(in_scale: float) -> float:
    return float(in_scale) * 2.0 ** -(GELU_FRAC + 1)


def erf_fixed(u: Tensor) -> Tensor:
    """I-BERT's erf polynomial in Q16 for Q16 ``u`` (int64)."""
    w = u.abs().clamp(max=ERF_B) - ERF_B
    poly = round_shift(ERF_A * w * w, 2 * GELU_FRAC) + ONE
    return torch.sign(u) * poly


@qpipe_op(
    "gelu_int",
    kind=OpKind.NONLINEARITY,
    scale_rule=ScaleRule.OBSERVED,
    inputs=("x",),
    multipliers=("m",),
    shift="s",
    clamp=("lo", "hi"),
    out_bits="bits",
    product_scale=lambda in_scales, v: gelu_product_scale(in_scales[0]),
)
def gelu_int(x: Tensor, m_u: int, s_u: int, m: Tensor, s: Tensor, lo: int, hi: int, bits: int) -> Tensor:
    """Integer i-GELU: Q16 input, I-BERT's erf polynomial, ``x * (1 + erf)`` requantized by (m, s)."""
    x64 = x.to(torch.int64)
    u = round_shift(x64 * int(m_u), int(s_u))
    acc = x64 * (ONE + erf_fixed(u))
    return requant_reference(acc, m, s, 0, lo, hi).to(dtype_for_range(bits, lo, hi))


@gelu_int.register_fake
def _(x, m_u, s_u, m, s, lo, hi, bits):
    return torch.empty_like(x, dtype=dtype_for_range(bits, lo, hi))
