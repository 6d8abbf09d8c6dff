"""Property tests: the nonlinear ``qpipe::`` kernels (exp, softmax, sigmoid, SiLU, GLU,
product, mean, GELU) are bit-exact against an independent exact reference, and
within a stated error bound of the float functions over their whole int8 range.

The reference re-does each kernel's specified integer steps in Python ints and
``fractions.Fraction`` (never with the kernels' helpers): ``half_up(v) =
floor(v + 1/2)``. The polynomial coefficients are data (``EXP2_POLY``, ``ERF_A``,
``ERF_B``), read from the op modules; the arithmetic on them is redone here.
"""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import qpipe.ir.ops  # noqa: F401  (registers torch.ops.qpipe.*)
from qpipe.ir.dyadic import dyadic
from qpipe.ir.ops.gelu import ERF_A, ERF_B, GELU_FRAC
from qpipe.ir.ops.iexp import EXP2_POLY, EXP_FRAC, exp_input_ratio, exp_m_bits
from qpipe.ir.ops.sigmoid import GATE_FRAC

Q = torch.ops.qpipe
ONE = 1 << EXP_FRAC
FAST = settings(max_examples=50, deadline=None, database=None)


pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------- reference


def half_up(v: Fraction) -> int:
    return math.floor(v + Fraction(1, 2))


def clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


def ref_exp(x: int, m: int, s: int) -> int:
    """exp(x S) in Q20: t = round(x m / 2**s) <= 0, 2**t = 2**k * P(f), Horner with half-up shifts."""
    t = min(0, half_up(Fraction(x * m, 2**s)))
    k = math.floor(Fraction(t, ONE))
    f = t - k * ONE
    p = EXP2_POLY[-1]
    for c in reversed(EXP2_POLY[:-1]):
        p = half_up(Fraction(p * f, ONE)) + c
    return half_up(Fraction(p, 2 ** min(-k, 62)))


def ref_sigmoid(x: int, m: int, s: int, steps: int) -> int:
    e = ref_exp(-abs(x), m, s)
    return half_up(Fraction((ONE if x >= 0 else e) * steps, ONE + e))


def exp_pair(scale: float, bits: int = 8) -> tuple[int, int]:
    return dyadic(exp_input_ratio(scale), m_bits=exp_m_bits(bits))


def i8(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int8)


scales = st.floats(min_value=1e-3, max_value=0.5, allow_nan=False)
int8s = st.integers(-127, 127)


# ---------------------------------------------------------------------------------------------- exactness


@FAST
@given(x=st.lists(st.integers(-127, 0), min_size=1, max_size=16), scale=scales)
@example(x=[0, -1, -127], scale=0.5)  # exp(0) is exactly 1.0; a deep shift
@example(x=[-127], scale=1e-3)
def test_exp_int_is_exact(x, scale):
    m, s = exp_pair(scale)
    out = Q.exp_int(i8(x), m, s, 32)
    assert out.tolist() == [ref_exp(v, m, s) for v in x]
    if 0 in x:
        assert out[x.index(0)] == ONE


@FAST
@given(rows=st.integers(1, 3), cols=st.integers(1, 12), data=st.data(), scale=scales, bits=st.sampled_from([8, 16]))
def test_softmax_int_is_exact(rows, cols, data, scale, bits):
    x = [[data.draw(int8s) for _ in range(cols)] for _ in range(rows)]
    m, s = exp_pair(scale)
    h = 2 ** (bits - 1) - 1
    out = Q.softmax_int(i8(x), -1, m, s, bits)
    assert out.dtype == (torch.int8 if bits == 8 else torch.int16)
    expect = []
    for row in x:
        e = [ref_exp(v - max(row), m, s) for v in row]
        expect.append([half_up(Fraction(v * h, sum(e))) for v in e])
    assert out.tolist() == expect


def test_softmax_int_over_another_dim_and_ties():
    m, s = exp_pair(0.1)
    x = torch.tensor([[[3, 3], [3, 3]], [[-127, 127], [0, 0]]], dtype=torch.int8)
    out = Q.softmax_int(x, 1, m, s, 8)
    ref = Q.softmax_int(x.transpose(1, 2).contiguous(), -1, m, s, 8).transpose(1, 2)
    assert torch.equal(out, ref)
    assert out[0].tolist() == [[64, 64], [64, 64]]  # 127/2 = 63.5 rounds half up
    assert out[1, :, 1].tolist() == [127, 0]


@FAST
@given(x=st.lists(int8s, min_size=1, max_size=16), scale=scales, bits=st.sampled_from([8, 16]))
@example(x=[0, 127, -127], scale=0.5, bits=8)  # sigmoid(0) = 1/2 -> 63.5 -> 64; saturation at both ends
def test_sigmoid_int_is_exact(x, scale, bits):
    m, s = exp_pair(scale)
    out = Q.sigmoid_int(i8(x), m, s, bits)
    assert out.tolist() == [ref_sigmoid(v, m, s, 2 ** (bits - 1) - 1) for v in x]


def _requant_pair(data, product_bits: int) -> tuple[int, int]:
    ratio = data.draw(st.floats(min_value=1e-7, max_value=0.5), label="ratio")
    return dyadic(ratio, m_bits=min(31, 61 - product_bits))


@FAST
@given(x=st.lists(int8s, min_size=1, max_size=16), scale=scales, data=st.data())
@example(x=[0, 1, -1, 127, -127], scale=0.1, data=None)
def test_silu_int_is_exact(x, scale, data):
    m_e, s_e = exp_pair(scale)
    m, s = dyadic(scale * 2.0**-GATE_FRAC / (0.8 * scale)) if data is None else _requant_pair(data, 24)
    out = Q.silu_int(i8(x), m_e, s_e, torch.tensor(m), torch.tensor(s), -127, 127, 8)
    expect = [clamp(half_up(Fraction(v * ref_sigmoid(v, m_e, s_e, 2**GATE_FRAC) * m, 2**s)), -127, 127) for v in x]
    assert out.tolist() == expect


@FAST
@given(pairs=st.lists(st.tuples(int8s, int8s), min_size=1, max_size=8), scale=scales, data=st.data())
def test_glu_int_is_exact(pairs, scale, data):
    m_e, s_e = exp_pair(scale)
    m, s = _requant_pair(data, 24)
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    x = torch.tensor([a + b], dtype=torch.int8)  # halves along dim 1
    out = Q.glu_int(x, 1, m_e, s_e, torch.tensor(m), torch.tensor(s), -127, 127, 8)
    expect = [clamp(half_up(Fraction(u * ref_sigmoid(v, m_e, s_e, 2**GATE_FRAC) * m, 2**s)), -127, 127)
              for u, v in pairs]
    assert out.tolist() == [expect]


@FAST
@given(a=st.lists(int8s, min_size=1, max_size=8), g=st.integers(0, 32767), data=st.data())
@example(a=[127, -127, 1, -1], g=32767, data=None)
def test_mul_requant_is_exact_and_broadcasts(a, g, data):
    m, s = dyadic(0.5**15) if data is None else _requant_pair(data, 24)
    out = Q.mul_requant(torch.tensor([a], dtype=torch.int8).reshape(1, -1, 1),
                        torch.tensor([[[g]]], dtype=torch.int16), torch.tensor(m), torch.tensor(s), -127, 127, 8)
    assert out.shape == (1, len(a), 1)
    assert out.flatten().tolist() == [clamp(half_up(Fraction(v * g * m, 2**s)), -127, 127) for v in a]


@FAST
@given(rows=st.lists(st.lists(int8s, min_size=1, max_size=20), min_size=1, max_size=3), data=st.data())
@example(rows=[[1, 2], [-1, -2]], data=None)  # means 1.5 and -1.5 round half up: 2 and -1
def test_mean_int_is_exact(rows, data):
    width = max(len(r) for r in rows)
    counts = [len(r) for r in rows]
    x = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int8)  # masked frames are zero
    m, s = (1, 0) if data is None else _requant_pair(data, 24)
    count = torch.tensor(counts, dtype=torch.int64).reshape(-1, 1)
    out = Q.mean_int(x, count, [-1], True, torch.tensor(m), torch.tensor(s), -127, 127, 8)
    assert out.flatten().tolist() == [clamp(half_up(Fraction(sum(r) * m, c * 2**s)), -127, 127) for r, c in zip(rows, counts)]
    plain = Q.mean_int(x, None, [-1], False, torch.tensor(m), torch.tensor(s), -127, 127, 8)  # divides by the width
    assert plain.tolist() == [clamp(half_up(Fraction(sum(r) * m, width * 2**s)), -127, 127) for r in rows]


@FAST
@given(x=st.lists(int8s, min_size=1, max_size=16), scale=scales, data=st.data())
def test_gelu_int_is_exact(x, scale, data):
    one = 1 << GELU_FRAC
    m_u, s_u = dyadic(scale / math.sqrt(2) * one, m_bits=31)
    m, s = _requant_pair(data, 26)
    out = Q.gelu_int(i8(x), m_u, s_u, torch.tensor(m), torch.tensor(s), -127, 127, 8)
    expect = []
    for v in x:
        u = half_up(Fraction(v * m_u, 2**s_u))
        w = min(abs(u), ERF_B) - ERF_B
        erf = (1 if u > 0 else -1 if u < 0 else 0) * (half_up(Fraction(ERF_A * w * w, one * one)) + one)
        expect.append(clamp(half_up(Fraction(v * (one + erf) * m, 2**s)), -127, 127))
    assert out.tolist() == expect


# ---------------------------------------------------------------------------------------------- error vs float

ALL8 = torch.arange(-127, 128, dtype=torch.int64)


@pytest.mark.parametrize("scale", [0.005, 0.03, 0.2])
def test_exp_error_over_the_range(scale):
    """Relative error of 2**f's quartic (4e-6) plus the Q20 rounding of t, the Horner steps and the result."""
    m, s = exp_pair(scale)
    x = -ALL8[ALL8 >= 0]
    got = Q.exp_int(x.to(torch.int8), m, s, 32).to(torch.float64) / ONE
    ref = torch.exp(x.to(torch.float64) * scale)
    assert float(((got - ref).abs() - 1e-5 * ref).max()) <= 3.0 / ONE


@pytest.mark.parametrize("scale", [0.005, 0.03, 0.2])
@pytest.mark.parametrize("bits", [8, 16])
def test_softmax_and_sigmoid_round_once_over_the_range(scale, bits):
    """Within 0.5 output steps plus what Q20 leaves (at 16 bits, a few hundredths of a step)."""
    h = 2 ** (bits - 1) - 1
    slack = 0.5 + (0.01 if bits == 8 else 0.1)
    m, s = exp_pair(scale)
    sig = Q.sigmoid_int(ALL8.to(torch.int8), m, s, bits).to(torch.float64)
    assert float((sig - torch.sigmoid(ALL8.to(torch.float64) * scale) * h).abs().max()) <= slack
    gen = torch.Generator().manual_seed(0)
    rows = torch.cat([ALL8[torch.randperm(255, generator=gen)][:240].reshape(-1, 16),
                      torch.randint(-127, 128, (200, 16), generator=gen)])
    sm = Q.softmax_int(rows.to(torch.int8), -1, m, s, bits).to(torch.float64)
    assert float((sm - torch.softmax(rows.to(torch.float64) * scale, -1) * h).abs().max()) <= slack


def test_gates_round_once_over_the_range():
    """SiLU and the product keep the gate at Q15: one rounding at the output (0.5 step plus 2**-15 relative)."""
    scale = 0.05
    ref = torch.nn.functional.silu(ALL8.to(torch.float64) * scale)
    out_scale = float(ref.abs().max()) / 127
    m_e, s_e = exp_pair(scale)
    m, s = dyadic(scale * 2.0**-GATE_FRAC / out_scale)
    got = Q.silu_int(ALL8.to(torch.int8), m_e, s_e, torch.tensor(m), torch.tensor(s), -127, 127, 8).to(torch.float64)
    assert float((got - ref / out_scale).abs().max()) <= 0.5 + 127 * 2.0**-14


def test_gelu_error_is_ibert_polynomials():
    """Integer i-GELU is I-BERT's float i-GELU (max error 0.0182 against GELU, the polynomial's own) plus one rounding."""
    scale = 0.05
    one = 1 << GELU_FRAC
    ref = torch.nn.functional.gelu(ALL8.to(torch.float64) * scale)
    out_scale = float(ref.abs().max()) / 127
    m_u, s_u = dyadic(scale / math.sqrt(2) * one, m_bits=31)
    m, s = dyadic(scale * 2.0 ** -(GELU_FRAC + 1) / out_scale)
    got = Q.gelu_int(ALL8.to(torch.int8), m_u, s_u, torch.tensor(m), torch.tensor(s), -127, 127, 8).to(torch.float64)
    x = ALL8.to(torch.float64) * scale
    v = x / math.sqrt(2)
    ibert = x / 2 * (1 + torch.sign(v) * (-0.2888 * (v.abs().clamp(max=1.769) - 1.769) ** 2 + 1))
    assert float((ibert - ref).abs().max()) <= 0.0183
    assert float((got * out_scale - ibert).abs().max()) <= 0.5 * out_scale + 4 * scale / (1 << GELU_FRAC) * 127
