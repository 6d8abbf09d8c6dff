"""Dyadic numbers ``m * 2**-s``: how integer-only kernels multiply by a real scale.

A requantization by a real ratio ``r`` becomes an integer multiply by ``m`` and a
right shift by ``s`` (round half up). ``m`` keeps 31 bits so that ``acc * m``
with a 32-bit accumulator fits in a signed 64-bit product.
"""
from __future__ import annotations

import math
from fractions import Fraction

M_BITS = 31
MAX_SHIFT = 62


def dyadic(ratio: float, m_bits: int = M_BITS) -> tuple[int, int]:
    """Closest ``(m, s)`` with ``0 <= m < 2**m_bits`` and ``m * 2**-s ~= ratio``.

    ``m`` is normalized into ``[2**(m_bits-1), 2**m_bits)`` when the shift allows,
    which keeps the relative error below ``2**-m_bits``.
    """
    if not math.isfinite(ratio) or ratio < 0:
        raise ValueError(f"a requantization ratio must be finite and >= 0, got {ratio!r}")
    if ratio == 0.0:
        return 0, 0
    exponent = math.frexp(ratio)[1]  # ratio = f * 2**exponent, f in [0.5, 1)
    shift = m_bits - exponent
    if shift < 0:
        raise ValueError(f"requantization ratio {ratio!r} needs more than {m_bits} integer bits")
    shift = min(shift, MAX_SHIFT)
    m = int(Fraction(ratio) * (1 << shift) + Fraction(1, 2)) if shift else int(ratio + 0.5)
    if m >= (1 << m_bits):  # rounding carried into a new bit
        if shift == 0:  # ratio in [2**m_bits - 1/2, 2**m_bits): m would need m_bits + 1 bits
            raise ValueError(f"requantization ratio {ratio!r} needs more than {m_bits} integer bits")
        m >>= 1
        shift -= 1
    return m, shift


def dyadic_common_shift(ratios: list[float], m_bits: int = M_BITS) -> tuple[list[int], int]:
    """Integers ``m_i`` and one shared ``s`` with ``m_i * 2**-s ~= ratios[i]``.

    Used by ops that add two tensors with different scales: both are rescaled to
    the output scale in one accumulator before a single rounding shift.
    """
    if any((not math.isfinite(r)) or r <= 0 for r in ratios):
        raise ValueError(f"ratios must be finite and > 0, got {ratios!r}")
    exponent = max(math.frexp(r)[1] for r in ratios)
    shift = min(max(m_bits - exponent, 0), MAX_SHIFT)
    ms = [int(Fraction(r) * (1 << shift) + Fraction(1, 2)) for r in ratios]
    if max(ms) >= (1 << m_bits):
        if shift == 0:  # a ratio >= 2**m_bits - 1/2 cannot be held in m_bits bits
            raise ValueError(f"requantization ratios {ratios!r} need more than {m_bits} integer bits")
        shift -= 1
        ms = [int(Fraction(r) * (1 << shift) + Fraction(1, 2)) for r in ratios]
    return ms, shift


def int_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """Symmetric (restricted) range: int8 is [-127, 127] so that -x never overflows."""
    if bits < 2 or bits > 32:
        raise ValueError(f"bit width must be in 2..32, got {bits}")
    hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    return (-hi if signed else 0), hi


def storage_dtype_name(bits: int) -> str:
    """Smallest torch integer dtype name that holds a signed value of ``bits`` bits."""
    if bits <= 8:
        return "int8"
    if bits <= 16:
        return "int16"
    if bits <= 32:
        return "int32"
    return "int64"
