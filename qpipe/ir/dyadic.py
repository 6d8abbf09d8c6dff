"""Dyadic numbers ``m * 2**-s``: how integer-only kernels multiply by a real scale.

A requantization by a real ratio ``r`` becomes an integer multiply by ``m`` and a
right shift by ``s`` (round half up). ``m`` keeps 31 bits so that ``acc * m``
with a 32-bit accumulator fits in a signed 64-bit product. A wider accumulator
(16-bit weights times 16-bit activations reach ~2**40) gets a shorter ``m``:
:func:`dyadic_bounded` takes the accumulator's proven bound and drops bits of
``m`` (and as many of ``s``) only until ``bound * m + 2**(s-1)`` fits int64, so
every pair that already fitted is unchanged.
"""
from __future__ import annotations

import math
from fractions import Fraction

M_BITS = 31
MAX_SHIFT = 62
INT64_MAX = (1 << 63) - 1
FLOAT64_EXACT = 1 << 53  # every integer below this is a float64; a product below it is exact in float64


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


def product_fits(bound: int, ms, s: int, bounds=None, limit: int = INT64_MAX) -> bool:
    """``sum_i bound_i * m_i + 2**(s-1) <= limit`` (default ``2**63 - 1``): the rounded product of every
    ``|v_i| <= bound_i`` fits int64 (or, with ``limit=FLOAT64_EXACT``, is exact in float64).

    ``ms`` is one multiplier or a list (an add of several terms, each ``|v_i| <= bounds[i]``,
    or all ``<= bound`` when ``bounds`` is None).
    """
    ms = [ms] if isinstance(ms, int) else list(ms)
    bounds = [bound] * len(ms) if bounds is None else list(bounds)
    half = (1 << (s - 1)) if s > 0 else 0
    return sum(int(b) * abs(int(m)) for b, m in zip(bounds, ms)) + half <= limit


def dyadic_bounded(ratio: float, bound: int, m_bits: int = M_BITS, limit: int = INT64_MAX) -> tuple[int, int]:
    """``dyadic(ratio, k)`` for the largest ``k <= m_bits`` with ``bound * m + 2**(s-1) <= limit``.

    ``bound`` is a proven bound on ``|acc|``: with it the kernel's int64 ``acc * m + 2**(s-1)``
    cannot overflow. Where ``m_bits`` already fits (every 32-bit accumulator) the pair is
    exactly ``dyadic(ratio, m_bits)``. ``limit=FLOAT64_EXACT``: the rounded product is also
    exact in float64, so a backend may requantize in float64 with the same result.
    """
    bound = int(bound)
    for bits in range(m_bits, 0, -1):
        try:
            m, s = dyadic(ratio, m_bits=bits)
        except ValueError:  # the ratio needs more integer bits than are left
            if bits == m_bits:
                raise
            break
        if product_fits(bound, m, s, limit=limit):
            return m, s
    raise ValueError(f"requantization ratio {ratio!r} of an accumulator bounded by {bound} cannot be "
                     f"applied in int64 (|acc| * m + 2**(s-1) overflows for every m)")


def dyadic_common_shift_bounded(ratios: list[float], bounds: list[int], m_bits: int = M_BITS) -> tuple[list[int], int]:
    """``dyadic_common_shift`` narrowed like :func:`dyadic_bounded`: ``sum_i bounds_i * m_i + 2**(s-1) < 2**63``."""
    for bits in range(m_bits, 0, -1):
        try:
            ms, s = dyadic_common_shift(ratios, m_bits=bits)
        except ValueError:
            if bits == m_bits:
                raise
            break
        if product_fits(0, ms, s, bounds):
            return ms, s
    raise ValueError(f"requantization ratios {ratios!r} of terms bounded by {bounds} cannot be applied in int64")


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
    """Symmetric (restricted) range of weights and constants: int8 is [-127, 127], so that -w never
    overflows and a weight's scale is its max over 127 (activations: :func:`act_range`)."""
    if bits < 2 or bits > 32:
        raise ValueError(f"bit width must be in 2..32, got {bits}")
    hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    return (-hi if signed else 0), hi


def act_range(bits: int, unsigned: bool = False) -> tuple[int, int]:
    """The codes an activation of ``bits`` bits may take: the full signed range ``[-2**(bits-1), 2**(bits-1) - 1]``
    (int8: [-128, 127], what every runtime's 8-bit QuantizeLinear saturates to) or, for an output
    that an activation keeps non-negative (a ReLU's), the unsigned ``[0, 2**bits - 1]`` (uint8:
    [0, 255], one more bit of resolution where half the signed codes would go unused)."""
    if bits < 2 or bits > 32:
        raise ValueError(f"bit width must be in 2..32, got {bits}")
    if unsigned:
        return 0, (1 << bits) - 1
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def storage_dtype_name(bits: int) -> str:
    """Smallest torch integer dtype name that holds a signed value of ``bits`` bits."""
    if bits <= 8:
        return "int8"
    if bits <= 16:
        return "int16"
    if bits <= 32:
        return "int32"
    return "int64"
