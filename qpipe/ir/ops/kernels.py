"""Integer arithmetic shared by the ``qpipe::`` reference kernels.

Convolutions and matmuls run their integer dot products in floating point:
every int8*int8 product and partial sum is an integer below 2**24 (float32) or
2**53 (float64), so the float result *is* the exact integer
(``exact_float_dtype`` proves the bound from the data of each call).
Rounding is "half up": ``(v * m + 2**(s-1)) >> s`` with an arithmetic shift,
except in the float32-faithful requantization (:func:`requant_f32_reference`).
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor

_DTYPE_FOR_BITS = {8: torch.int8, 16: torch.int16, 32: torch.int32, 64: torch.int64}


def dtype_for_bits(bits: int) -> torch.dtype:
    for width, dtype in sorted(_DTYPE_FOR_BITS.items()):
        if bits <= width:
            return dtype
    raise ValueError(f"no integer dtype holds {bits} bits")


def unsigned_codes(bits: int, lo: int, hi: int) -> bool:
    """A clamp ``[lo, hi]`` of ``bits`` bits that int8 cannot hold but uint8 can: a ReLU output on [0, 255]."""
    return bits <= 8 and lo >= 0 and hi > 127


def dtype_for_range(bits: int, lo: int, hi: int) -> torch.dtype:
    """Storage of an output clamped to ``[lo, hi]``: ``uint8`` for codes int8 cannot hold but uint8
    can (a ReLU output on the unsigned grid ``[0, 255]``), else the signed type of ``bits``."""
    if unsigned_codes(bits, lo, hi):
        if hi > 255:
            raise ValueError(f"an 8-bit output clamped to [{lo}, {hi}] does not fit uint8")
        return torch.uint8
    return dtype_for_bits(bits)


def exact_float_dtype(x: Tensor, w: Tensor, reduction: int) -> torch.dtype:
    """The narrowest float type in which this integer dot product is exact.

    Every product and every partial sum is an integer of magnitude at most
    ``max|x| * max|w| * reduction``; below 2**24 float32 holds them all exactly
    (in any summation order), below 2**53 float64 does. The bound is taken from
    the data, so it is proven for this call.
    """
    if x.numel() == 0 or w.numel() == 0:
        return torch.float64
    bound = int(x.abs().max()) * int(w.abs().max()) * max(reduction, 1)
    if bound < (1 << 24):
        return torch.float32
    if bound < (1 << 53):
        return torch.float64
    raise ValueError(f"integer dot product of length {reduction} may reach {bound}: beyond exact float64")


def round_shift(v: Tensor, s: Tensor | int) -> Tensor:
    """``round_half_up(v / 2**s)`` on int64 tensors, ``s >= 0`` (per element or scalar)."""
    s = torch.as_tensor(s, dtype=torch.int64, device=v.device)
    half = torch.where(s > 0, torch.bitwise_left_shift(torch.ones_like(s), (s - 1).clamp_min(0)), torch.zeros_like(s))
    return torch.bitwise_right_shift(v + half, s)


def bit_length(v: Tensor) -> Tensor:
    """Bits of each non-negative int64 (``int.bit_length``), by a binary search of shifts."""
    v = v.clone()
    n = torch.zeros_like(v)
    for sh in (32, 16, 8, 4, 2, 1):
        big = (v >> sh) > 0
        n = n + big.to(torch.int64) * sh
        v = torch.where(big, v >> sh, v)
    return n + (v > 0).to(torch.int64)


def shift_half_even(v: Tensor, sh: Tensor) -> Tensor:
    """``round_half_even(v / 2**sh)`` of int64 ``v`` for shifts ``sh >= 0`` (per element)."""
    q = torch.bitwise_right_shift(v, sh)  # floor
    rem = v - torch.bitwise_left_shift(q, sh)
    half = torch.where(sh > 0, torch.bitwise_left_shift(torch.ones_like(sh), (sh - 1).clamp_min(0)), torch.zeros_like(sh))
    up = (sh > 0) & ((rem > half) | ((rem == half) & ((q & 1) == 1)))
    return q + up.to(torch.int64)


F32_BITS = 24  # float32 significand


def to_f32_grid(v: Tensor) -> tuple[Tensor, Tensor]:
    """``fl32(v)`` of int64 ``v`` as ``(mantissa, exponent)`` with ``fl32(v) = mantissa * 2**exponent``:
    ``v`` rounded half to even to 24 significant bits, as a float32 conversion rounds it."""
    a = v.abs()
    if a.numel() and int(a.max()) < (1 << 53):  # the bit count read off float64's exponent: exact below 2**53
        bits = torch.frexp(a.to(torch.float64))[1].to(torch.int64)
    else:
        bits = bit_length(a)
    sh = (bits - F32_BITS).clamp_min(0)
    return shift_half_even(v, sh), sh


def requant_f32_reference(acc: Tensor, m: Tensor, s: Tensor, channel_dim: int, lo: int, hi: int) -> Tensor:
    """``clamp(round_half_even(fl32(fl32(acc) * M)), lo, hi)`` with the float32 multiplier ``M = m * 2**-s``
    (``m < 2**24``), in integers: what ONNX Runtime's QLinearConv / QGemm (MLAS), TensorRT and a float32
    epilogue compute, bit for bit (float32 products round to nearest even, and so does the final conversion).

    ``fl32(acc)`` is ``acc`` on the 24-bit grid; its product with ``m`` is exact in int64 (< 2**48),
    rounded once more to 24 significant bits (the float32 product), then shifted by ``s`` to an
    integer, half to even. No float arithmetic is involved; ``tests/ir/test_f32_requant.py`` checks it
    against torch's float32 multiply on the boundary cases.
    """
    acc = acc.to(torch.int64)
    m = broadcast_channel(m.to(torch.int64), acc.dim(), channel_dim)
    s = broadcast_channel(s.to(torch.int64), acc.dim(), channel_dim)
    a, ea = to_f32_grid(acc)
    p, ep = to_f32_grid(a * m)
    shift = s - ea - ep  # fl32(fl32(acc) * M) = p * 2**-shift
    left = (-shift).clamp_min(0)
    out = torch.where(shift > 0, shift_half_even(p, shift.clamp_min(0)), torch.bitwise_left_shift(p, left))
    return out.clamp(lo, hi)


def requantize(acc: Tensor, m: Tensor, s: Tensor, channel_dim: int, lo: int, hi: int, f32: bool) -> Tensor:
    """The dyadic requantization (half up) or, with ``f32``, the float32-faithful one (half to even)."""
    if f32:
        return requant_f32_reference(acc, m, s, channel_dim, lo, hi)
    return requant_reference(acc, m, s, channel_dim, lo, hi)


def f32_multiplier(ratio: float) -> tuple[int, int]:
    """``(m, s)`` with ``m * 2**-s`` the float32 nearest ``ratio`` exactly (``2**23 <= m < 2**24``)."""
    f = float(np.float32(ratio))
    if not math.isfinite(f) or f <= 0:
        raise ValueError(f"a float32 requantization multiplier must be finite and > 0, got {ratio!r}")
    frac, exponent = math.frexp(f)
    m = int(frac * (1 << F32_BITS))
    return m, F32_BITS - exponent


def broadcast_channel(t: Tensor, ndim: int, channel_dim: int) -> Tensor:
    if t.numel() == 1:
        return t.reshape(())
    shape = [1] * ndim
    shape[channel_dim] = t.numel()
    return t.reshape(shape)


def requant_reference(acc: Tensor, m: Tensor, s: Tensor, channel_dim: int, lo: int, hi: int) -> Tensor:
    """``clamp((acc * m + 2**(s-1)) >> s, lo, hi)`` in int64, per channel."""
    acc = acc.to(torch.int64)
    m = broadcast_channel(m.to(torch.int64), acc.dim(), channel_dim)
    s = broadcast_channel(s.to(torch.int64), acc.dim(), channel_dim)
    return round_shift(acc * m, s).clamp(lo, hi)


def div_round_half_up(x: Tensor, scale: float) -> Tensor:
    """``floor(x / scale + 1/2)`` of the exact quotient, as float64 integers (``scale > 0``).

    ``floor(x / scale + 0.5)`` in float64 rounds twice: the ``+ 0.5`` can round
    up (0.49999999999999994 -> 1) and the quotient can round onto a half-integer
    that the exact quotient lies just below. Here the float64 quotient ``t`` is
    compared with ``h = floor(t) + 1/2`` exactly; only when ``t == h`` can the exact
    quotient be on either side of ``h`` (``t`` is the float nearest to it), and
    then the sign of ``x - h * scale`` decides, exactly.
    """
    x = x.to(torch.float64)
    t = x / scale
    k = torch.floor(t)
    h = k + 0.5  # exact while |k| < 2**52; larger quotients are clamped anyway
    q = k + (t > h).to(torch.float64)
    tie = (t == h) & torch.isfinite(t)  # an infinite quotient saturates in the clamp
    if bool(tie.any()):
        xt, ht = x[tie], h[tie]
        p = ht * scale  # correctly rounded h*scale: if x != p, x - h*scale has the sign of x - p
        up = xt > p
        same = xt == p
        exact_product = math.frexp(scale)[0] == 0.5  # a power-of-two scale: p is h*scale exactly ...
        same_idx = same.nonzero().flatten()
        if same_idx.numel() and not (exact_product and bool((p[same].abs() >= _FLOAT64_MIN_NORMAL).all())):
            fs = Fraction(scale)  # ... otherwise decide the rare x == fl(h*scale) cases in rationals
            for i in same_idx.tolist():
                up[i] = Fraction(xt[i].item()) >= Fraction(ht[i].item()) * fs
        else:
            up = up | same
        q[tie] = k[tie] + up.to(torch.float64)
    return q


_FLOAT64_MIN_NORMAL = 2.2250738585072014e-308
