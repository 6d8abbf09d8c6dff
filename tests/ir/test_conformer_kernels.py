"""Property tests of the Conformer's integer kernels against exact arithmetic.

Expected values come from Python integers, ``math.isqrt`` and ``fractions.Fraction``,
never from the kernels' helpers. Rounding is half up: ``floor(v + 1/2)``.
"""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import qpipe.ir.ops  # noqa: F401  (registers torch.ops.qpipe.*)
from qpipe.ir.ops.layernorm import LN_FRAC_BITS, bit_length, isqrt_newton, layer_norm_scale

Q = torch.ops.qpipe
FAST = settings(max_examples=50, deadline=None, database=None)


pytestmark = pytest.mark.usefixtures("single_thread")


def half_up(v: Fraction) -> int:
    return math.floor(v + Fraction(1, 2))


def clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


# ---------------------------------------------------------------------------
# integer square root (Newton) and bit length


@FAST
@given(st.lists(st.integers(0, 2**62), min_size=1, max_size=40))
@example([0, 1, 2, 3, 4, 2**62, 2**62 - 1, (2**31 - 1) ** 2, (2**31 - 1) ** 2 - 1])
def test_isqrt_newton_is_floor_sqrt(values):
    n = torch.tensor(values, dtype=torch.int64)
    assert isqrt_newton(n).tolist() == [math.isqrt(v) for v in values]
    assert bit_length(n).tolist() == [v.bit_length() for v in values]


# ---------------------------------------------------------------------------
# LayerNorm core


def ref_layer_norm_row(row: list[int], eps_int: int, k: int, j: int) -> list[int]:
    d = len(row)
    total = sum(row)
    c = [d * x - total for x in row]
    n = sum(v * v for v in c) + eps_int
    r = max(math.isqrt(n << (2 * j)), 1)
    return [half_up(Fraction(v << (k + j), r)) for v in c]


rows = st.integers(2, 40).flatmap(lambda d: st.lists(st.lists(st.integers(-127, 127), min_size=d, max_size=d),
                                                      min_size=1, max_size=4))


@settings(max_examples=25, deadline=None, database=None)
@given(rows, st.integers(0, 10**6), st.integers(0, 12))
@example([[0, 0, 0, 0]], 0, 0)  # a constant row with eps 0: r clamps to 1, every output 0
@example([[127, -127]], 0, 12)  # the largest |c| / sqrt(N): exactly 2**K / sqrt(2) * sqrt(2) = 2**K
@example([[5, 5, 5, 6]], 3, 5)
def test_layer_norm_core_matches_exact_integers(x, eps_int, j):
    t = torch.tensor(x, dtype=torch.int8)
    out = Q.layer_norm_core(t, eps_int, LN_FRAC_BITS, j, 16)
    assert out.dtype == torch.int16
    expect = [ref_layer_norm_row(r, eps_int, LN_FRAC_BITS, j) for r in x]
    assert out.tolist() == expect
    assert max(abs(v) for r in expect for v in r) <= 2**LN_FRAC_BITS + 1


@FAST
@given(rows, st.floats(1e-3, 0.5), st.sampled_from([1e-5, 1e-3]))
def test_layer_norm_core_is_within_a_step_of_the_real_normalization(x, s_x, eps):
    """Against (x - mean) / sqrt(var + eps) of the real values, in exact rationals (sqrt by isqrt of a scaled N)."""
    d = len(x[0])
    eps_int = half_up(Fraction(eps) * d**3 / Fraction(s_x) ** 2)
    j = 12
    out = Q.layer_norm_core(torch.tensor(x, dtype=torch.int16), eps_int, LN_FRAC_BITS, j, 16).tolist()
    step = layer_norm_scale(d)
    for row, got in zip(x, out):
        mean = Fraction(sum(row), d)
        var = sum((Fraction(v) - mean) ** 2 for v in row) / d
        denom = math.sqrt(float(var + Fraction(eps_int, d**3)))  # eps as the kernel sees it (rounded to eps_int)
        for v, q in zip(row, got):
            real = float(Fraction(v) - mean) / denom if denom > 0 else 0.0
            assert abs(q * step - real) <= 0.5 * step + 1e-6 * max(1.0, abs(real)), (row, v, q * step, real)


# ---------------------------------------------------------------------------
# matmul of two activations


@FAST
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 6), st.integers(1, 5), st.data())
def test_matmul_acc_and_rq_match_python_integers(b, n, k, p, data):
    ints = st.integers(-127, 127)
    a = data.draw(st.lists(ints, min_size=b * n * k, max_size=b * n * k))
    w = data.draw(st.lists(ints, min_size=k * p, max_size=k * p))
    m = data.draw(st.integers(0, 2**31 - 1))
    s = data.draw(st.integers(0, 40))
    ta = torch.tensor(a, dtype=torch.int8).reshape(b, n, k)
    tb = torch.tensor(w, dtype=torch.int8).reshape(1, k, p)  # broadcast batch, as Q x P^T
    acc = Q.matmul_acc(ta, tb, 32)
    rq = Q.matmul_rq(ta, tb, torch.tensor([m]), torch.tensor([s]), -127, 127, 8)
    for i in range(b):
        for r in range(n):
            for c in range(p):
                exact = sum(a[(i * n + r) * k + t] * w[t * p + c] for t in range(k))
                assert int(acc[i, r, c]) == exact
                assert int(rq[i, r, c]) == clamp(half_up(Fraction(exact * m, 2**s)), -127, 127)


# ---------------------------------------------------------------------------
# multiplication by constants, masking, padding


@FAST
@given(st.lists(st.integers(-32767, 32767), min_size=1, max_size=12), st.data())
def test_scale_rq_matches_fractions(x, data):
    c = len(x)
    per_channel = data.draw(st.booleans())
    n = c if per_channel else 1
    draw = data.draw
    w = draw(st.lists(st.integers(-127, 127), min_size=n, max_size=n))
    bias = draw(st.lists(st.integers(-2**20, 2**20), min_size=n, max_size=n))
    m = draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n))
    s = draw(st.lists(st.integers(0, 45), min_size=n, max_size=n))
    out = Q.scale_rq(torch.tensor(x, dtype=torch.int16).reshape(1, c), torch.tensor(w, dtype=torch.int8),
                     torch.tensor(bias, dtype=torch.int64), torch.tensor(m), torch.tensor(s), 1, -127, 127, 8)
    pick = (lambda v, i: v[i]) if per_channel else (lambda v, i: v[0])
    expect = [clamp(half_up(Fraction((x[i] * pick(w, i) + pick(bias, i)) * pick(m, i), 2 ** pick(s, i))), -127, 127)
              for i in range(c)]
    assert out.flatten().tolist() == expect


def test_masked_fill_and_pad_write_the_integer_value():
    x = torch.tensor([[1, -2, 3], [4, 5, -6]], dtype=torch.int8)
    mask = torch.tensor([[True, False, True]])
    assert Q.masked_fill_int(x, mask, -127).tolist() == [[-127, -2, -127], [-127, 5, -127]]
    assert Q.pad_int(x, [1, 2], 0).tolist() == [[0, 1, -2, 3, 0, 0], [0, 4, 5, -6, 0, 0]]
    assert Q.pad_int(x, [1, 0], 0).dtype == torch.int8
