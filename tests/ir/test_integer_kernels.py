"""Property tests: the ``qpipe::`` integer kernels are bit-exact.

Every expected value is computed independently of ``qpipe/ir/ops/`` in Python
integers and ``fractions.Fraction`` (never with the kernels' own helpers such as
``round_shift`` or ``requant_reference``). Rounding is "half up":
``round(v) = floor(v + 1/2)``, so 2.5 -> 3, -2.5 -> -2, -1.5 -> -1.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import qpipe.ir.ops  # noqa: F401  (registers torch.ops.qpipe.*)
from qpipe.ir.dyadic import dyadic, dyadic_common_shift

Q = torch.ops.qpipe

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
M_LIMIT = 2**31  # dyadic multipliers are < 2**31
MAX_SHIFT = 62
OUT_DTYPE = {8: torch.int8, 16: torch.int16, 32: torch.int32}

pytestmark = pytest.mark.usefixtures("single_thread")


FAST = settings(max_examples=150, deadline=None, database=None)
SLOW = settings(max_examples=60, deadline=None, database=None)


# ---------------------------------------------------------------------------
# the independent exact reference


def half_up(v: Fraction) -> int:
    """floor(v + 1/2) of an exact rational."""
    return math.floor(v + Fraction(1, 2))


def clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


def ref_requant(acc: int, m: int, s: int, lo: int, hi: int) -> int:
    return clamp(half_up(Fraction(acc * m, 2**s)), lo, hi)


def restricted_range(bits: int) -> tuple[int, int]:
    hi = 2 ** (bits - 1) - 1
    return -hi, hi


def ref_conv1d(x, w, bias, stride, padding, dilation, groups):
    """Naive integer conv1d over nested lists: x[n][ci][t], w[co][ci_g][k]."""
    n_batch, c_in, length = len(x), len(x[0]), len(x[0][0])
    c_out, c_in_g, kernel = len(w), len(w[0]), len(w[0][0])
    c_out_g = c_out // groups
    out_len = (length + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    out = []
    for n in range(n_batch):
        rows = []
        for co in range(c_out):
            g = co // c_out_g
            row = []
            for t in range(out_len):
                total = 0 if bias is None else bias[co]
                for ci in range(c_in_g):
                    for k in range(kernel):
                        pos = t * stride + k * dilation - padding
                        if 0 <= pos < length:
                            total += w[co][ci][k] * x[n][g * c_in_g + ci][pos]
                row.append(total)
            rows.append(row)
        out.append(rows)
    return out


def ref_linear(x_rows, w, bias):
    """x_rows: list of input vectors; returns list of output vectors."""
    return [
        [sum(xi * wi for xi, wi in zip(row, w_row)) + (0 if bias is None else bias[o]) for o, w_row in enumerate(w)]
        for row in x_rows
    ]


# ---------------------------------------------------------------------------
# strategies

int32s = st.integers(INT32_MIN, INT32_MAX)
multipliers = st.integers(0, M_LIMIT - 1)
shifts = st.integers(0, MAX_SHIFT)
out_bits = st.sampled_from([8, 16, 32])


@st.composite
def acc_m_s(draw, max_product_bits_over: int = 20):
    """(acc, m, s) where the quotient acc*m/2**s is often of a size that does not clamp.

    Uniform (acc, m, s) almost always rounds to 0 or saturates, so most draws put
    s just below the bit length of |acc*m|.
    """
    acc = draw(int32s)
    m = draw(multipliers)
    if draw(st.booleans()):
        s = draw(shifts)
    else:
        s = min(MAX_SHIFT, max(0, abs(acc * m).bit_length() - draw(st.integers(0, max_product_bits_over))))
    return acc, m, s


@st.composite
def lo_hi_for(draw, bits: int):
    lo, hi = restricted_range(bits)
    kind = draw(st.sampled_from(["full", "relu", "random"]))
    if kind == "full":
        return lo, hi
    if kind == "relu":
        return 0, hi
    a = draw(st.integers(lo, hi))
    b = draw(st.integers(lo, hi))
    return min(a, b), max(a, b)


def int8_values(n: int):
    """n int8 values: random, or an extreme fill (-127/127/-128/alternating)."""
    fill = st.sampled_from(["random", "max", "min", "neg128", "alternating"])

    @st.composite
    def build(draw):
        kind = draw(fill)
        if kind == "max":
            return [127] * n
        if kind == "min":
            return [-127] * n
        if kind == "neg128":
            return [-128] * n
        if kind == "alternating":
            return [127 if i % 2 else -127 for i in range(n)]
        raw = draw(st.binary(min_size=n, max_size=n))  # cheaper to generate than lists of integers
        return [b - 256 if b > 127 else b for b in raw]

    return build()


def nest(flat, shape):
    """Flat list -> nested lists of the given shape."""
    if len(shape) == 1:
        return list(flat)
    step = len(flat) // shape[0]
    return [nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


# ---------------------------------------------------------------------------
# 1. requant: dyadic rounding


@FAST
@given(data=acc_m_s(), bits=out_bits, m_dtype=st.sampled_from([torch.int64, torch.int32]), st_data=st.data())
@example(data=(5, 1, 1), bits=8, m_dtype=torch.int64, st_data=None)  # 2.5 -> 3
@example(data=(-5, 1, 1), bits=8, m_dtype=torch.int64, st_data=None)  # -2.5 -> -2
@example(data=(-3, 1, 1), bits=8, m_dtype=torch.int64, st_data=None)  # -1.5 -> -1
@example(data=(INT32_MIN, M_LIMIT - 1, MAX_SHIFT), bits=32, m_dtype=torch.int64, st_data=None)
@example(data=(INT32_MAX, M_LIMIT - 1, MAX_SHIFT), bits=32, m_dtype=torch.int64, st_data=None)
@example(data=(INT32_MIN, M_LIMIT - 1, 31), bits=32, m_dtype=torch.int64, st_data=None)
@example(data=(-(2**30), 1, 31), bits=8, m_dtype=torch.int64, st_data=None)  # exactly -1/2 -> 0
def test_requant_scalar_matches_fraction(data, bits, m_dtype, st_data):
    acc, m, s = data
    if st_data is None:
        lo, hi = restricted_range(bits)
    else:
        lo, hi = st_data.draw(lo_hi_for(bits))
    # a few neighbours of acc, so one call checks several quotients with the same (m, s)
    accs = [clamp(acc + d, INT32_MIN, INT32_MAX) for d in (-2, -1, 0, 1, 2)] + [-acc if acc > INT32_MIN else acc]
    out = Q.requant(
        torch.tensor(accs, dtype=torch.int32), torch.tensor(m, dtype=m_dtype), torch.tensor(s, dtype=m_dtype), 0, lo, hi, bits
    )
    assert out.dtype == OUT_DTYPE[bits]
    assert out.tolist() == [ref_requant(a, m, s, lo, hi) for a in accs]


@FAST
@given(
    odd_acc=st.integers(-(2**15), 2**15).map(lambda v: 2 * v + 1),
    odd_m=st.integers(0, 2**29).map(lambda v: 2 * v + 1),
    s=st.integers(1, 16),
)
@example(odd_acc=5, odd_m=1, s=1)  # 2.5 -> 3 (half-even would give 2)
@example(odd_acc=-5, odd_m=1, s=1)  # -2.5 -> -2 (half-away-from-zero would give -3)
@example(odd_acc=-1, odd_m=1, s=1)  # -0.5 -> 0
@example(odd_acc=-1, odd_m=(2**31) - 1, s=16)
def test_requant_exact_ties_round_half_up(odd_acc, odd_m, s):
    """acc * m an odd multiple of 2**(s-1): the quotient is exactly k + 1/2 and must go to k + 1."""
    acc = odd_acc * 2 ** (s - 1)
    assume(INT32_MIN <= acc <= INT32_MAX)
    q = Fraction(acc * odd_m, 2**s)
    assert q.denominator == 2  # a genuine tie
    lo, hi = restricted_range(32)
    out = Q.requant(torch.tensor([acc], dtype=torch.int32), torch.tensor(odd_m), torch.tensor(s), 0, lo, hi, 32)
    assert out.item() == clamp(int(q + Fraction(1, 2)), lo, hi) == ref_requant(acc, odd_m, s, lo, hi)


@pytest.mark.parametrize(
    "acc, m, s, expected",
    [
        (5, 1, 1, 3),  # 2.5
        (-5, 1, 1, -2),  # -2.5
        (3, 1, 1, 2),  # 1.5
        (-3, 1, 1, -1),  # -1.5
        (1, 1, 1, 1),  # 0.5
        (-1, 1, 1, 0),  # -0.5
        (10, 1, 2, 3),  # 2.5 through a shift of 2
        (-10, 1, 2, -2),
        (-6, 1, 2, -1),  # -1.5
        (-7, 1, 2, -2),  # -1.75
        (-9, 1, 2, -2),  # -2.25
        (7, 3, 3, 3),  # 21/8 = 2.625
        (254, 1, 1, 127),  # 127 exactly
        (255, 1, 1, 127),  # 127.5 -> 128 -> clamped
        (-255, 1, 1, -127),  # -127.5 -> -127
        (-257, 1, 1, -127),  # -128.5 -> -128 -> clamped
        (123, 0, 0, 0),  # m = 0
        (-123, 1, 0, -123),  # s = 0 is the identity
    ],
)
def test_requant_hand_examples(acc, m, s, expected):
    out = Q.requant(torch.tensor([acc], dtype=torch.int32), torch.tensor([m]), torch.tensor([s]), 0, -127, 127, 8)
    assert out.dtype == torch.int8
    assert out.item() == expected == ref_requant(acc, m, s, -127, 127)


@st.composite
def per_channel_case(draw):
    channels = draw(st.integers(1, 6))
    layout = draw(st.sampled_from(["ncl", "nlc", "nc"]))
    batch = draw(st.integers(1, 2))
    length = draw(st.integers(1, 4))
    if layout == "ncl":
        shape, channel_dim = (batch, channels, length), draw(st.sampled_from([1, -2]))
    elif layout == "nlc":
        shape, channel_dim = (batch, length, channels), draw(st.sampled_from([2, -1]))
    else:
        shape, channel_dim = (batch, channels), draw(st.sampled_from([1, -1]))
    # int32 accumulators of all sizes (a random right shift spreads their magnitudes)
    accs = [draw(int32s) >> draw(st.integers(0, 31)) for _ in range(math.prod(shape))]
    ms = [draw(multipliers) for _ in range(channels)]
    # per-channel shifts around the multiplier's bit length: quotients from 0 to far beyond int8
    ss = [min(MAX_SHIFT, max(0, m.bit_length() + draw(st.integers(-2, 30)))) for m in ms]
    bits = draw(out_bits)
    lo, hi = draw(lo_hi_for(bits))
    return shape, channel_dim, accs, ms, ss, bits, lo, hi


@FAST
@given(case=per_channel_case(), m_dtype=st.sampled_from([torch.int64, torch.int32]))
def test_requant_per_channel_matches_fraction(case, m_dtype):
    shape, channel_dim, accs, ms, ss, bits, lo, hi = case
    acc = torch.tensor(accs, dtype=torch.int32).reshape(shape)
    out = Q.requant(acc, torch.tensor(ms, dtype=m_dtype), torch.tensor(ss, dtype=m_dtype), channel_dim, lo, hi, bits)
    assert out.dtype == OUT_DTYPE[bits]
    assert out.shape == acc.shape
    cdim = channel_dim % len(shape)
    expected = torch.empty(shape, dtype=torch.int64)
    for index in torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, len(shape)).tolist():
        c = index[cdim]
        expected[tuple(index)] = ref_requant(int(acc[tuple(index)]), ms[c], ss[c], lo, hi)
    assert out.to(torch.int64).tolist() == expected.tolist()


# ---------------------------------------------------------------------------
# 2. dyadic approximation of a real ratio


def check_correctly_rounded(m: int, s: int, r: float) -> None:
    assert isinstance(m, int) and isinstance(s, int)
    assert 0 <= m < M_LIMIT
    assert 0 <= s <= MAX_SHIFT
    # m is round(r * 2**s): within half a unit in the last place of the dyadic grid
    assert abs(Fraction(m, 2**s) - Fraction(r)) <= Fraction(1, 2 ** (s + 1))


@FAST
@given(r=st.floats(min_value=1e-9, max_value=1e3, allow_nan=False, allow_infinity=False))
@example(r=1e-9)
@example(r=1e3)
@example(r=1.0)
@example(r=0.5)
@example(r=1.0 - 2.0**-53)  # rounding carries into bit 31: m = 2**30, one shift less
@example(r=2.0**-29 * (1.0 - 2.0**-40))
@example(r=0.1)
@example(r=1.0 + 2.0**-31)  # exactly half a unit above 1 at s = 30: rounds up (half up)
def test_dyadic_correctly_rounded_and_normalized(r):
    m, s = dyadic(r)
    check_correctly_rounded(m, s, r)
    assert m >= 2**30  # normalized: r >= 1e-9 never hits the shift limit
    rel = abs(Fraction(m, 2**s) - Fraction(r)) / Fraction(r)
    assert rel < Fraction(1, 2**30)


def test_dyadic_ties_round_half_up():
    # 1 + 2**-31 sits exactly halfway between 2**30 and 2**30 + 1 units of 2**-30
    assert dyadic(1.0 + 2.0**-31) == (2**30 + 1, 30)
    assert dyadic(1.0 + 3 * 2.0**-31) == (2**30 + 2, 30)  # half-even would give 2**30 + 1
    assert dyadic(1.0 - 2.0**-53) == (2**30, 30)
    assert dyadic(0.0) == (0, 0)


@FAST
@given(r=st.floats(min_value=2.0**-40, max_value=2.0**31 - 0.5, exclude_max=True, allow_nan=False))
@example(r=2.0**31 - 0.75)
@example(r=2.0**30)
@example(r=2.0**-40)
@example(r=2.0**-33 * 1.5)
def test_dyadic_wide_range_stays_in_bounds(r):
    m, s = dyadic(r)
    check_correctly_rounded(m, s, r)


@SLOW
@given(r=st.floats(min_value=2.0**31 - 0.5, max_value=1e30, allow_nan=False, allow_infinity=False))
@example(r=2.0**31 - 0.25)  # would round to m = 2**31 at s = 0
@example(r=2.0**31)
def test_dyadic_rejects_ratios_needing_32_bits(r):
    with pytest.raises(ValueError):
        dyadic(r)


@FAST
@given(
    ra=st.floats(min_value=1e-9, max_value=1e3, allow_nan=False, allow_infinity=False),
    rb=st.floats(min_value=1e-9, max_value=1e3, allow_nan=False, allow_infinity=False),
)
@example(ra=1.0, rb=1.0)
@example(ra=1.0 - 2.0**-53, rb=0.25)  # carry in the larger ratio
@example(ra=1e-9, rb=1e3)
@example(ra=0.75, rb=1.0 + 2.0**-31)
def test_dyadic_common_shift_two_ratios(ra, rb):
    (ma, mb), s = dyadic_common_shift([ra, rb])
    check_correctly_rounded(ma, s, ra)
    check_correctly_rounded(mb, s, rb)
    big, m_big = (ra, ma) if ra >= rb else (rb, mb)
    assert m_big >= 2**30  # the larger ratio uses the full 31 bits
    rel = abs(Fraction(m_big, 2**s) - Fraction(big)) / Fraction(big)
    assert rel < Fraction(1, 2**30)


def test_dyadic_common_shift_rejects_too_large():
    with pytest.raises(ValueError):
        dyadic_common_shift([2.0**31 - 0.25, 1.0])
    with pytest.raises(ValueError):
        dyadic_common_shift([2.0**40, 1.0])


# ---------------------------------------------------------------------------
# 3. conv / linear accumulation


@st.composite
def conv_case(draw, with_bias=None):
    batch = draw(st.integers(1, 2))
    c_in = draw(st.integers(1, 6))
    c_out = draw(st.integers(1, 6))
    groups = draw(st.sampled_from([g for g in range(1, 7) if c_in % g == 0 and c_out % g == 0]))
    kernel = draw(st.integers(1, 5))
    stride = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 3))
    dilation = draw(st.integers(1, 2))
    length = draw(st.integers(1, 12))
    assume(length + 2 * padding - dilation * (kernel - 1) - 1 >= 0)  # at least one output
    x = nest(draw(int8_values(batch * c_in * length)), (batch, c_in, length))
    w = nest(draw(int8_values(c_out * (c_in // groups) * kernel)), (c_out, c_in // groups, kernel))
    has_bias = draw(st.booleans()) if with_bias is None else with_bias
    bias = draw(st.lists(st.integers(-(2**30), 2**30), min_size=c_out, max_size=c_out)) if has_bias else None
    return x, w, bias, stride, padding, dilation, groups


def conv_tensors(x, w, bias):
    return (
        torch.tensor(x, dtype=torch.int8),
        torch.tensor(w, dtype=torch.int8),
        None if bias is None else torch.tensor(bias, dtype=torch.int32),
    )


@FAST
@given(case=conv_case())
@example(case=([[[127] * 12] * 6] * 2, [[[127] * 5] * 6] * 6, None, 1, 3, 1, 1))  # all extremes, padded
@example(case=([[[-127] * 12] * 6] * 2, [[[127] * 5] * 6] * 6, [2**30] * 6, 1, 3, 1, 1))
@example(case=([[[-128] * 12] * 6] * 2, [[[-128] * 5] * 6] * 6, [-(2**30)] * 6, 2, 3, 2, 1))
@example(case=([[[-127] * 7] * 6], [[[-127] * 3]] * 6, None, 2, 1, 2, 6))  # depthwise
def test_conv1d_acc_matches_python_loops(case):
    x, w, bias, stride, padding, dilation, groups = case
    xt, wt, bt = conv_tensors(x, w, bias)
    out = Q.conv1d_acc(xt, wt, bt, [stride], [padding], [dilation], groups, 32)
    assert out.dtype == torch.int32
    assert out.tolist() == ref_conv1d(x, w, bias, stride, padding, dilation, groups)


@st.composite
def linear_case(draw, with_bias=None):
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    in_f = draw(st.integers(1, 16))
    out_f = draw(st.integers(1, 6))
    rows = math.prod(lead) if lead else 1
    x_rows = nest(draw(int8_values(rows * in_f)), (rows, in_f))
    w = nest(draw(int8_values(out_f * in_f)), (out_f, in_f))
    has_bias = draw(st.booleans()) if with_bias is None else with_bias
    bias = draw(st.lists(st.integers(-(2**30), 2**30), min_size=out_f, max_size=out_f)) if has_bias else None
    return lead, x_rows, w, bias


@FAST
@given(case=linear_case())
@example(case=([2], [[127] * 16] * 2, [[127] * 16] * 6, [2**30] * 6))
@example(case=([], [[-128] * 16], [[-128] * 16] * 6, None))
@example(case=([3], [[-127] * 16] * 3, [[127] * 16] * 6, [-(2**30)] * 6))
def test_linear_acc_matches_python_dot_products(case):
    lead, x_rows, w, bias = case
    in_f, out_f = len(w[0]), len(w)
    xt = torch.tensor(x_rows, dtype=torch.int8).reshape(*lead, in_f)
    bt = None if bias is None else torch.tensor(bias, dtype=torch.int32)
    out = Q.linear_acc(xt, torch.tensor(w, dtype=torch.int8), bt, 32)
    assert out.dtype == torch.int32
    assert tuple(out.shape) == (*lead, out_f)
    assert out.reshape(-1, out_f).tolist() == ref_linear(x_rows, w, bias)


@st.composite
def long_conv_case(draw):
    """Reductions of > 1024 int8 products: sums pass 2**24, where float32 accumulation stops being exact."""
    c_in = draw(st.integers(120, 160))
    kernel = draw(st.integers(7, 9))
    c_out = draw(st.integers(1, 2))
    length = draw(st.integers(kernel, kernel + 2))
    x = nest(draw(int8_values(c_in * length)), (1, c_in, length))
    w = nest(draw(int8_values(c_out * c_in * kernel)), (c_out, c_in, kernel))
    bias = draw(st.one_of(st.none(), st.lists(st.integers(-(2**30), 2**30), min_size=c_out, max_size=c_out)))
    return x, w, bias, 1, 0, 1, 1


@settings(max_examples=15, deadline=None, database=None)
@given(case=long_conv_case())
@example(case=([[[127] * 9] * 160], [[[127] * 9] * 160], [2**30], 1, 0, 1, 1))  # 2**30 + 160*9*127*127
@example(case=([[[-128] * 9] * 160], [[[127] * 9] * 160], [-(2**30)], 1, 0, 1, 1))
@example(case=([[[127, -127] * 4 + [127]] * 160], [[[127, -127] * 4 + [127]] * 160], None, 1, 0, 1, 1))
def test_conv1d_acc_long_reduction_is_exact(case):
    x, w, bias, stride, padding, dilation, groups = case
    xt, wt, bt = conv_tensors(x, w, bias)
    out = Q.conv1d_acc(xt, wt, bt, [stride], [padding], [dilation], groups, 32)
    assert out.dtype == torch.int32
    assert out.tolist() == ref_conv1d(x, w, bias, stride, padding, dilation, groups)


@settings(max_examples=15, deadline=None, database=None)
@given(in_f=st.integers(1030, 1500), out_f=st.integers(1, 3), rows=st.integers(1, 2), data=st.data())
@example(in_f=1500, out_f=1, rows=1, data=None)
def test_linear_acc_long_reduction_is_exact(in_f, out_f, rows, data):
    if data is None:  # all extremes: 1500 * 127 * 127 + bias, odd and above 2**24
        x_rows, w, bias = [[127] * in_f], [[127] * in_f], [2**30 + 1]
    else:
        x_rows = nest(data.draw(int8_values(rows * in_f)), (rows, in_f))
        w = nest(data.draw(int8_values(out_f * in_f)), (out_f, in_f))
        bias = data.draw(st.one_of(st.none(), st.lists(st.integers(-(2**30), 2**30), min_size=out_f, max_size=out_f)))
    bt = None if bias is None else torch.tensor(bias, dtype=torch.int32)
    out = Q.linear_acc(torch.tensor(x_rows, dtype=torch.int8), torch.tensor(w, dtype=torch.int8), bt, 32)
    assert out.dtype == torch.int32
    assert out.tolist() == ref_linear(x_rows, w, bias)


# ---------------------------------------------------------------------------
# 4. fused conv1d_rq / linear_rq == requant(acc) in Python ints


@st.composite
def requant_params(draw, channels: int):
    per_channel = draw(st.booleans())
    n = channels if per_channel else 1
    ms = [draw(multipliers) for _ in range(n)]
    # the accumulators here are below 2**21: shifts around bit_length(m) + 14 give int8-sized quotients
    ss = [min(MAX_SHIFT, max(0, m.bit_length() + draw(st.integers(0, 24)))) for m in ms]
    bits = draw(st.sampled_from([8, 16]))
    lo, hi = draw(lo_hi_for(bits))
    return ms, ss, bits, lo, hi


@SLOW
@given(case=conv_case(), data=st.data())
@example(
    case=([[[127] * 12] * 6] * 2, [[[127] * 5] * 6] * 6, [2**30] * 6, 1, 3, 1, 1),
    data=None,
)
def test_conv1d_rq_equals_requant_of_acc(case, data):
    x, w, bias, stride, padding, dilation, groups = case
    c_out = len(w)
    if data is None:
        ms, ss, bits, lo, hi = [2**30] * c_out, [31] * c_out, 8, -127, 127
    else:
        ms, ss, bits, lo, hi = data.draw(requant_params(c_out))
    xt, wt, bt = conv_tensors(x, w, bias)
    out = Q.conv1d_rq(
        xt, wt, bt, torch.tensor(ms), torch.tensor(ss), [stride], [padding], [dilation], groups, lo, hi, bits
    )
    assert out.dtype == OUT_DTYPE[bits]
    acc = ref_conv1d(x, w, bias, stride, padding, dilation, groups)
    expected = [
        [[ref_requant(v, ms[co % len(ms)], ss[co % len(ss)], lo, hi) for v in row] for co, row in enumerate(rows)]
        for rows in acc
    ]
    assert out.tolist() == expected


@SLOW
@given(case=linear_case(), data=st.data())
def test_linear_rq_equals_requant_of_acc(case, data):
    lead, x_rows, w, bias = case
    in_f, out_f = len(w[0]), len(w)
    ms, ss, bits, lo, hi = data.draw(requant_params(out_f))
    xt = torch.tensor(x_rows, dtype=torch.int8).reshape(*lead, in_f)
    bt = None if bias is None else torch.tensor(bias, dtype=torch.int32)
    out = Q.linear_rq(xt, torch.tensor(w, dtype=torch.int8), bt, torch.tensor(ms), torch.tensor(ss), lo, hi, bits)
    assert out.dtype == OUT_DTYPE[bits]
    assert tuple(out.shape) == (*lead, out_f)
    acc = ref_linear(x_rows, w, bias)
    expected = [[ref_requant(v, ms[o % len(ms)], ss[o % len(ss)], lo, hi) for o, v in enumerate(row)] for row in acc]
    assert out.reshape(-1, out_f).tolist() == expected


# ---------------------------------------------------------------------------
# 5. residual add


def add_rq(a, b, ma: int, mb: int, s: int, lo: int, hi: int, bits: int):
    """qpipe.add_requant with its dyadic pair as int64 tensors, the one way pairs travel."""
    return Q.add_requant(a, b, torch.tensor(ma, dtype=torch.int64), torch.tensor(mb, dtype=torch.int64),
                         torch.tensor(s, dtype=torch.int64), lo, hi, bits)


def ref_add(a: int, b: int, ma: int, mb: int, s: int, lo: int, hi: int) -> int:
    return clamp(half_up(Fraction(a * ma + b * mb, 2**s)), lo, hi)


@st.composite
def add_params(draw):
    if draw(st.booleans()):  # what the pass emits: a common shift for two real ratios
        ra = draw(st.floats(min_value=1e-3, max_value=1e2))
        rb = draw(st.floats(min_value=1e-3, max_value=1e2))
        (ma, mb), s = dyadic_common_shift([ra, rb])
    else:
        ma, mb = draw(multipliers), draw(multipliers)
        s = min(MAX_SHIFT, max(0, max(ma, mb).bit_length() + draw(st.integers(-8, 12))))
    bits = draw(st.sampled_from([8, 16]))
    lo, hi = draw(lo_hi_for(bits))
    return ma, mb, s, bits, lo, hi


@st.composite
def add_operands(draw):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    b_shape = tuple(n if draw(st.booleans()) else 1 for n in shape)  # b may broadcast
    a = draw(int8_values(math.prod(shape)))
    b = draw(int8_values(math.prod(b_shape)))
    return shape, a, b_shape, b


@FAST
@given(ops=add_operands(), params=add_params())
@example(ops=((4,), [5, -5, 3, -3], (4,), [0, 0, 0, 0]), params=(1, 1, 1, 8, -127, 127))  # 2.5 -1.5 ties
@example(ops=((2,), [1, -1], (2,), [1, -2]), params=(3, 1, 1, 8, -127, 127))  # 2.0, -2.5
@example(ops=((3,), [127, -127, -128], (3,), [127, -127, -128]), params=(2**31 - 1, 2**31 - 1, 31, 8, -127, 127))
@example(ops=((3,), [127, -127, 1], (1,), [127]), params=(2**31 - 1, 2**31 - 1, 0, 16, -32767, 32767))
def test_add_requant_matches_fraction(ops, params):
    shape, a, b_shape, b = ops
    ma, mb, s, bits, lo, hi = params
    at = torch.tensor(a, dtype=torch.int8).reshape(shape)
    bt = torch.tensor(b, dtype=torch.int8).reshape(b_shape)
    out = add_rq(at, bt, ma, mb, s, lo, hi, bits)
    assert out.dtype == OUT_DTYPE[bits]
    assert tuple(out.shape) == shape
    a64, b64 = at.to(torch.int64), bt.to(torch.int64).expand(shape)
    expected = [ref_add(x, y, ma, mb, s, lo, hi) for x, y in zip(a64.flatten().tolist(), b64.flatten().tolist())]
    assert out.flatten().tolist() == expected


# ---------------------------------------------------------------------------
# 6. clamping at the integer limits


@FAST
@given(bits=st.sampled_from([8, 16]), sign=st.sampled_from([1, -1]), acc=st.integers(2**20, INT32_MAX), extra=st.integers(0, 5))
def test_requant_saturates_exactly(bits, sign, acc, extra):
    lo, hi = restricted_range(bits)
    # acc * 2**30 / 2**(30 - extra) = acc * 2**extra is far beyond the range: it must pin to lo / hi, never wrap
    m, s = 2**30, 30 - extra
    out = Q.requant(torch.tensor([sign * acc, 0, sign], dtype=torch.int32), torch.tensor(m), torch.tensor(s), 0, lo, hi, bits)
    assert out.dtype == OUT_DTYPE[bits]
    assert out.tolist() == [sign * hi if sign > 0 else lo, 0, sign * (2**extra) if 2**extra <= hi else sign * hi]


@pytest.mark.parametrize("bits", [8, 16])
def test_requant_boundary_values(bits):
    lo, hi = restricted_range(bits)
    # quotients hi - 0.5, hi, hi + 0.5, hi + 1 and their negatives, with m = 1, s = 1
    accs = [2 * hi - 1, 2 * hi, 2 * hi + 1, 2 * hi + 2, -(2 * hi - 1), -(2 * hi), -(2 * hi + 1), -(2 * hi + 2), -(2 * hi + 3)]
    out = Q.requant(torch.tensor(accs, dtype=torch.int32), torch.tensor(1), torch.tensor(1), 0, lo, hi, bits)
    assert out.dtype == OUT_DTYPE[bits]
    # -(hi + 0.5) rounds half up to -hi: inside; -(hi + 1.5) -> -(hi + 1): clamped to lo = -hi
    assert out.tolist() == [hi, hi, hi, hi, -hi + 1, -hi, -hi, lo, lo]
    assert out.tolist() == [ref_requant(a, 1, 1, lo, hi) for a in accs]


@FAST
@given(data=acc_m_s(max_product_bits_over=4), bits=st.sampled_from([8, 16]), st_data=st.data())
def test_requant_never_leaves_lo_hi(data, bits, st_data):
    acc, m, s = data
    lo, hi = st_data.draw(lo_hi_for(bits))
    accs = [acc, -acc if acc > INT32_MIN else acc, INT32_MIN, INT32_MAX]
    out = Q.requant(torch.tensor(accs, dtype=torch.int32), torch.tensor(m), torch.tensor(s), 0, lo, hi, bits)
    assert out.dtype == OUT_DTYPE[bits]
    values = out.tolist()
    assert all(lo <= v <= hi for v in values)
    assert values == [ref_requant(a, m, s, lo, hi) for a in accs]


@FAST
@given(ops=add_operands(), params=add_params())
def test_add_requant_never_leaves_lo_hi(ops, params):
    shape, a, b_shape, b = ops
    ma, mb, s, bits, lo, hi = params
    # the largest operands push the sum far outside: results must pin at lo / hi
    at = torch.tensor(a, dtype=torch.int8).reshape(shape)
    bt = torch.tensor(b, dtype=torch.int8).reshape(b_shape)
    out = add_rq(at, bt, ma, mb, min(s, 8), lo, hi, bits)
    assert out.dtype == OUT_DTYPE[bits]
    assert bool(((out >= lo) & (out <= hi)).all())
    full = add_rq(
        torch.full(shape, 127, dtype=torch.int8), torch.full(b_shape, 127, dtype=torch.int8), 2**31 - 1, 2**31 - 1, 8, lo, hi, bits
    )
    assert bool((full == hi).all())
    full_neg = add_rq(
        torch.full(shape, -127, dtype=torch.int8), torch.full(b_shape, -128, dtype=torch.int8), 2**31 - 1, 2**31 - 1, 8, lo, hi, bits
    )
    assert bool((full_neg == lo).all())


@FAST
@given(
    values=st.lists(st.integers(-128, 127), min_size=1, max_size=32),
    bounds=st.tuples(st.integers(-128, 127), st.integers(-128, 127)),
    dtype_bits=st.sampled_from([8, 16, 32]),
)
@example(values=[-128, -127, 0, 127], bounds=(-127, 127), dtype_bits=8)
@example(values=[-128, -5, 0, 5, 127], bounds=(0, 127), dtype_bits=8)  # ReLU
@example(values=[-128, -5, 0, 5, 127], bounds=(-6, 6), dtype_bits=16)  # hardtanh
def test_clamp_int_matches_python(values, bounds, dtype_bits):
    lo, hi = min(bounds), max(bounds)
    x = torch.tensor(values, dtype=OUT_DTYPE[dtype_bits])
    out = Q.clamp_int(x, lo, hi)
    assert out.dtype == x.dtype
    assert out.tolist() == [clamp(v, lo, hi) for v in values]
    assert x.tolist() == values  # the input is not modified


# ---------------------------------------------------------------------------
# 7. quantize: the float -> int boundary


def ref_quantize(x: float, scale: float, bits: int) -> int:
    """ONNX QuantizeLinear: the float32 quotient of float32 x and scale (IEEE division, which numpy's
    float32 is), rounded half to even (Python's round of that exact value), saturated to the full range."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        q = np.float32(x) / np.float32(scale)
    if math.isinf(q):
        return hi if q > 0 else lo
    return clamp(round(Fraction(float(q))), lo, hi)


scales = st.one_of(
    st.floats(min_value=1e-6, max_value=1e3, allow_nan=False, allow_infinity=False),
    st.integers(-20, 5).map(lambda e: 2.0**e),  # power-of-two scales: many exact ties
)


@st.composite
def near_tie(draw, scale):
    """A float64 x within a few ulps of (k + 1/2) * scale: where double rounding bites."""
    k = draw(st.integers(-140, 140))
    x = (k + 0.5) * scale
    for _ in range(draw(st.integers(0, 3))):
        x = math.nextafter(x, math.inf if draw(st.booleans()) else -math.inf)
    return x


@SLOW
@given(scale=scales, bits=st.sampled_from([8, 16]), data=st.data())
def test_quantize_matches_fraction(scale, bits, data):
    xs = data.draw(
        st.lists(
            st.one_of(
                near_tie(scale),
                st.floats(min_value=-200 * scale, max_value=200 * scale, allow_nan=False),
                st.floats(allow_nan=False, allow_infinity=True),
            ),
            min_size=1,
            max_size=24,
        )
    )
    out = Q.quantize(torch.tensor(xs, dtype=torch.float64), scale, bits)
    assert out.dtype == OUT_DTYPE[bits]
    assert out.tolist() == [ref_quantize(x, scale, bits) for x in xs]


@pytest.mark.parametrize(
    "x, scale, expected",
    [
        (2.5, 1.0, 2),  # half to even
        (3.5, 1.0, 4),
        (-2.5, 1.0, -2),
        (-1.5, 1.0, -2),
        (-0.5, 1.0, 0),
        (0.5, 1.0, 0),
        (0.49999999999999994, 1.0, 0),  # float32(x) is 0.5
        (0.5000001, 1.0, 1),
        (126.5, 1.0, 126),
        (127.5, 1.0, 127),  # 128, saturated
        (-127.5, 1.0, -128),
        (-128.5, 1.0, -128),
        (1e300, 1.0, 127),  # float32(x) is inf
        (-1e300, 1.0, -128),
        (float("inf"), 0.1, 127),
        (float("-inf"), 0.1, -128),
        (0.0, 1e-6, 0),
        (-0.0, 1e-6, 0),
        (0.3, 0.1, 3),  # the float32 quotient, not the float64 one (2.9999999999999996)
    ],
)
def test_quantize_hand_examples(x, scale, expected):
    out = Q.quantize(torch.tensor([x], dtype=torch.float64), scale, 8)
    assert out.dtype == torch.int8
    assert out.item() == expected == ref_quantize(x, scale, 8)


@FAST
@given(
    xs=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=16),
    scale=scales,
)
def test_quantize_float32_input(xs, scale):
    x = torch.tensor(xs, dtype=torch.float32)
    out = Q.quantize(x, scale, 16)
    assert out.dtype == torch.int16
    assert out.tolist() == [ref_quantize(v, scale, 16) for v in x.tolist()]


def test_float_path_is_chosen_by_the_proven_bound():
    """Short reductions run in float32, long ones in float64; both stay exact (int64 reference)."""
    from qpipe.ir.ops.kernels import exact_float_dtype as _exact_float_dtype

    gen = torch.Generator().manual_seed(0)
    for reduction, expected in ((64, torch.float32), (8192, torch.float64)):
        x = torch.randint(-127, 128, (3, reduction), generator=gen, dtype=torch.int8)
        w = torch.randint(-127, 128, (5, reduction), generator=gen, dtype=torch.int8)
        x[0, :] = 127
        w[0, :] = 127
        assert _exact_float_dtype(x, w, reduction) == expected
        got = torch.ops.qpipe.linear_acc(x, w, None, 64)
        want = torch.matmul(x.to(torch.int64), w.to(torch.int64).t())
        assert torch.equal(got, want)
