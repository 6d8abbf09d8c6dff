"""The float32-faithful requantization, in integers, against float32 arithmetic itself.

``requant_f32_reference`` must equal ``round_half_even(fl32(fl32(acc) * M))`` bit for bit:
that is what ONNX Runtime's fused QLinearConv / QGemm compute (``ort_rounding.ort_requant``
emulates MLAS and is tested against ORT), and what a float32 GPU epilogue computes.
"""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpipe.ir.ops.kernels import f32_multiplier, requant_f32_reference, shift_half_even


def _float32_way(acc: torch.Tensor, ratio: float) -> torch.Tensor:
    mult = torch.tensor(float(np.float32(ratio)), dtype=torch.float32)
    return torch.round(acc.to(torch.float32) * mult).to(torch.int64)


def _boundary_accs(ratio: float, lo: int, hi: int, span: int = 3) -> torch.Tensor:
    """Accumulators whose exact product lies next to a half-integer of the output grid, and past the 2**24 edge."""
    ties = np.arange(lo, hi, dtype=np.float64) + 0.5
    centers = np.floor(ties / ratio).astype(np.int64)
    accs = (centers[:, None] + np.arange(-span, span + 1)[None, :]).reshape(-1)
    wide = np.array([(1 << 24) - 1, 1 << 24, (1 << 24) + 1, (1 << 24) + 3, (1 << 26) + 5, -(1 << 25) - 7], np.int64)
    return torch.from_numpy(np.concatenate([accs, wide, -accs]))


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=1e-7, max_value=0.5, allow_nan=False), st.sampled_from([(-128, 127), (0, 255), (-32768, 32767)]))
def test_integer_emulation_is_float32_arithmetic_bit_for_bit(ratio, bounds):
    lo, hi = bounds
    m, s = f32_multiplier(ratio)
    assert 1 << 23 <= m < 1 << 24 and m * 2.0**-s == float(np.float32(ratio))
    acc = _boundary_accs(m * 2.0**-s, lo, hi)
    got = requant_f32_reference(acc, torch.tensor([m]), torch.tensor([s]), 0, lo, hi)
    want = _float32_way(acc, ratio).clamp(lo, hi)
    assert torch.equal(got, want), (ratio, acc[got != want][:5].tolist())


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(1 << 40), max_value=1 << 40), st.integers(min_value=0, max_value=30))
def test_shift_half_even_matches_exact_rationals(v, sh):
    from fractions import Fraction

    exact = Fraction(v, 1 << sh)
    floor = exact.numerator // exact.denominator
    rem = exact - floor
    want = floor + (1 if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and floor % 2 == 1) else 0)
    assert int(shift_half_even(torch.tensor([v]), torch.tensor([sh]))[0]) == want


def test_per_channel_multipliers_follow_the_channel_axis():
    acc = torch.arange(-600, 600, 7, dtype=torch.int64).reshape(1, 2, -1)
    ratios = [0.0123, 0.37]
    ms = torch.tensor([f32_multiplier(r)[0] for r in ratios])
    ss = torch.tensor([f32_multiplier(r)[1] for r in ratios])
    got = requant_f32_reference(acc, ms, ss, 1, -128, 127)
    for c, r in enumerate(ratios):
        assert torch.equal(got[0, c], _float32_way(acc[0, c], r).clamp(-128, 127))
