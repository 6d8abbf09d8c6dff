"""The ``qpipe::`` integer op set, registered with ``torch.library``.

Each op has an exact integer CPU reference kernel and a fake kernel (shapes and
dtypes only, for ``torch.export`` and meta propagation). The reference kernels
are the definition of the numbers: backends must reproduce them bit for bit.

Convolutions and matmuls run their integer dot products in floating point:
every int8*int8 product and partial sum is an integer below 2**24 (float32) or
2**53 (float64), so the float result *is* the exact integer
(``_exact_float_dtype`` proves the bound from the data of each call).
Rounding is always "half up": ``(v * m + 2**(s-1)) >> s`` with an arithmetic
shift.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional, Sequence

import torch
from torch import Tensor

_DTYPE_FOR_BITS = {8: torch.int8, 16: torch.int16, 32: torch.int32, 64: torch.int64}


def dtype_for_bits(bits: int) -> torch.dtype:
    for width, dtype in sorted(_DTYPE_FOR_BITS.items()):
        if bits <= width:
            return dtype
    raise ValueError(f"no integer dtype holds {bits} bits")


def _exact_float_dtype(x: Tensor, w: Tensor, reduction: int) -> torch.dtype:
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


def _broadcast_channel(t: Tensor, ndim: int, channel_dim: int) -> Tensor:
    if t.numel() == 1:
        return t.reshape(())
    shape = [1] * ndim
    shape[channel_dim] = t.numel()
    return t.reshape(shape)


def requant_reference(acc: Tensor, m: Tensor, s: Tensor, channel_dim: int, lo: int, hi: int) -> Tensor:
    """``clamp((acc * m + 2**(s-1)) >> s, lo, hi)`` in int64, per channel."""
    acc = acc.to(torch.int64)
    m = _broadcast_channel(m.to(torch.int64), acc.dim(), channel_dim)
    s = _broadcast_channel(s.to(torch.int64), acc.dim(), channel_dim)
    return round_shift(acc * m, s).clamp(lo, hi)


def _conv_acc(x: Tensor, w: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int) -> Tensor:
    ft = _exact_float_dtype(x, w, w.shape[1] * w.shape[2])
    acc = torch.nn.functional.conv1d(
        x.to(ft), w.to(ft), None, list(stride), list(padding), list(dilation), groups
    ).to(torch.int64)
    if bias is not None:
        acc = acc + bias.to(torch.int64).reshape(1, -1, 1)
    return acc


def _linear_acc(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    ft = _exact_float_dtype(x, w, w.shape[1])
    acc = torch.matmul(x.to(ft), w.to(ft).t()).to(torch.int64)
    if bias is not None:
        acc = acc + bias.to(torch.int64)
    return acc


def _conv_fake_shape(x: Tensor, w: Tensor, stride, padding, dilation, groups: int) -> Tensor:
    return torch.nn.functional.conv1d(
        x.to(torch.float32), w.to(torch.float32), None, list(stride), list(padding), list(dilation), groups
    )


# ---------------------------------------------------------------------------
# quantize: the input quantizer, the one float->int boundary of the graph


def _div_round_half_up(x: Tensor, scale: float) -> Tensor:
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


@torch.library.custom_op("qpipe::quantize", mutates_args=())
def quantize(x: Tensor, scale: float, bits: int) -> Tensor:
    """Symmetric per-tensor quantizer: ``clamp(floor(x / scale + 1/2))``, exact in the float64 values."""
    hi = (1 << (bits - 1)) - 1
    q = _div_round_half_up(x, scale).clamp(-hi, hi)
    return q.to(dtype_for_bits(bits))


@quantize.register_fake
def _(x, scale, bits):
    return torch.empty_like(x, dtype=dtype_for_bits(bits))


@torch.library.custom_op("qpipe::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: float) -> Tensor:
    """Integer tensor back to float32 (used outside the integer region only)."""
    return (q.to(torch.float64) * scale).to(torch.float32)


@dequantize.register_fake
def _(q, scale):
    return torch.empty_like(q, dtype=torch.float32)


# ---------------------------------------------------------------------------
# accumulating ops: int8 x int8 -> int32 (or int64 when the bound needs it)


@torch.library.custom_op("qpipe::conv1d_acc", mutates_args=())
def conv1d_acc(
    x: Tensor,
    w: Tensor,
    bias: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    acc_bits: int,
) -> Tensor:
    """Integer 1-D convolution; returns the exact accumulator (bias at S_x*S_w)."""
    return _conv_acc(x, w, bias, stride, padding, dilation, groups).to(dtype_for_bits(acc_bits))


@conv1d_acc.register_fake
def _(x, w, bias, stride, padding, dilation, groups, acc_bits):
    return _conv_fake_shape(x, w, stride, padding, dilation, groups).to(dtype_for_bits(acc_bits))


@torch.library.custom_op("qpipe::linear_acc", mutates_args=())
def linear_acc(x: Tensor, w: Tensor, bias: Optional[Tensor], acc_bits: int) -> Tensor:
    """Integer ``x @ w.T + bias`` over the last dimension; exact accumulator."""
    return _linear_acc(x, w, bias).to(dtype_for_bits(acc_bits))


@linear_acc.register_fake
def _(x, w, bias, acc_bits):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=dtype_for_bits(acc_bits))


# ---------------------------------------------------------------------------
# requantization


@torch.library.custom_op("qpipe::requant", mutates_args=())
def requant(acc: Tensor, m: Tensor, s: Tensor, channel_dim: int, lo: int, hi: int, bits: int) -> Tensor:
    """Dyadic requantization ``clamp((acc*m + 2**(s-1)) >> s, lo, hi)``; m, s per channel or scalar."""
    return requant_reference(acc, m, s, channel_dim, lo, hi).to(dtype_for_bits(bits))


@requant.register_fake
def _(acc, m, s, channel_dim, lo, hi, bits):
    return torch.empty_like(acc, dtype=dtype_for_bits(bits))


@torch.library.custom_op("qpipe::add_requant", mutates_args=())
def add_requant(a: Tensor, b: Tensor, ma: int, mb: int, s: int, lo: int, hi: int, bits: int) -> Tensor:
    """Residual add of two integer tensors with different scales: one shared shift."""
    v = a.to(torch.int64) * ma + b.to(torch.int64) * mb
    return round_shift(v, s).clamp(lo, hi).to(dtype_for_bits(bits))


@add_requant.register_fake
def _(a, b, ma, mb, s, lo, hi, bits):
    return torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=dtype_for_bits(bits), device=a.device)


@torch.library.custom_op("qpipe::clamp_int", mutates_args=())
def clamp_int(x: Tensor, lo: int, hi: int) -> Tensor:
    """ReLU / hardtanh on an integer tensor at an unchanged scale."""
    return x.clamp(lo, hi)


@clamp_int.register_fake
def _(x, lo, hi):
    return torch.empty_like(x)


# ---------------------------------------------------------------------------
# fused ops (what fuse-requant makes): accumulate, requantize, clamp, in one op


@torch.library.custom_op("qpipe::conv1d_rq", mutates_args=())
def conv1d_rq(
    x: Tensor,
    w: Tensor,
    bias: Optional[Tensor],
    m: Tensor,
    s: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    lo: int,
    hi: int,
    bits: int,
) -> Tensor:
    """Integer conv1d + per-channel dyadic requant + clamp (ReLU) -> int8."""
    acc = _conv_acc(x, w, bias, stride, padding, dilation, groups)
    return requant_reference(acc, m, s, 1, lo, hi).to(dtype_for_bits(bits))


@conv1d_rq.register_fake
def _(x, w, bias, m, s, stride, padding, dilation, groups, lo, hi, bits):
    return _conv_fake_shape(x, w, stride, padding, dilation, groups).to(dtype_for_bits(bits))


@torch.library.custom_op("qpipe::linear_rq", mutates_args=())
def linear_rq(x: Tensor, w: Tensor, bias: Optional[Tensor], m: Tensor, s: Tensor, lo: int, hi: int, bits: int) -> Tensor:
    """Integer linear + per-output-feature dyadic requant + clamp -> int8."""
    acc = _linear_acc(x, w, bias)
    return requant_reference(acc, m, s, acc.dim() - 1, lo, hi).to(dtype_for_bits(bits))


@linear_rq.register_fake
def _(x, w, bias, m, s, lo, hi, bits):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=dtype_for_bits(bits))
