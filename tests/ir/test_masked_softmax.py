"""``qpipe.masked_softmax_int``: masked entries are exactly 0 and each row's unmasked
entries are ``softmax_int`` of those entries alone (the max and the sum run over them
only); a fully masked row is uniform, as float's softmax of a row of equal fills."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qpipe.ir.ops  # noqa: F401  (registers torch.ops.qpipe.*)
from qpipe.ir.dyadic import dyadic
from qpipe.ir.ops.iexp import exp_input_ratio, exp_m_bits

Q = torch.ops.qpipe
pytestmark = pytest.mark.usefixtures("single_thread")
PROPS = settings(max_examples=150, deadline=None, database=None)
DTYPE = {8: torch.int8, 16: torch.int16}


@PROPS
@given(
    rows=st.integers(1, 4),
    n=st.integers(1, 24),
    bits=st.sampled_from([8, 16]),
    out_bits=st.sampled_from([8, 16]),
    scale=st.floats(1e-4, 0.5),
    seed=st.integers(0, 2**31 - 1),
    p_mask=st.floats(0.0, 1.0),
)
def test_masked_entries_are_zero_and_the_rest_is_softmax_of_the_rest(rows, n, bits, out_bits, scale, seed, p_mask):
    gen = torch.Generator().manual_seed(seed)
    hi = 2 ** (bits - 1) - 1
    x = torch.randint(-hi, hi + 1, (rows, n), generator=gen).to(DTYPE[bits])
    mask = torch.rand(rows, n, generator=gen) < p_mask
    m, s = dyadic(exp_input_ratio(scale), m_bits=exp_m_bits(bits))
    out = Q.masked_softmax_int(x, mask, -1, m, s, out_bits)
    assert out.dtype == DTYPE[out_bits] and out.shape == x.shape
    for r in range(rows):
        keep = ~mask[r]
        if not keep.any():  # every entry masked: uniform, like softmax_int of a constant row
            uniform = Q.softmax_int(torch.zeros(1, n, dtype=x.dtype), -1, m, s, out_bits)[0]
            assert torch.equal(out[r], uniform)
            continue
        assert (out[r][mask[r]] == 0).all()
        alone = Q.softmax_int(x[r][keep].unsqueeze(0), -1, m, s, out_bits)[0]
        assert torch.equal(out[r][keep], alone)


def test_mask_broadcasts_over_heads_and_other_dims():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-127, 128, (2, 3, 5, 7), generator=gen).to(torch.int8)
    lengths = torch.tensor([4, 7])
    valid = torch.arange(7)[None, :] < lengths[:, None]
    mask = ~(valid[:, None, :5, None] & valid[:, None, None, :])  # (2, 1, 5, 7), NeMo's att_mask layout
    m, s = dyadic(exp_input_ratio(0.05), m_bits=exp_m_bits(8))
    out = Q.masked_softmax_int(x, mask, -1, m, s, 8)
    full = Q.masked_softmax_int(x, torch.broadcast_to(mask, x.shape).contiguous(), -1, m, s, 8)
    assert torch.equal(out, full)
    assert (out[0, :, :4, 4:] == 0).all()
    assert (out[0, :, 4] == 18).all()  # a padded query: its row is all masked, uniform round(127 / 7)
    assert torch.equal(out[0, :, :4, :4], Q.softmax_int(x[0, :, :4, :4], -1, m, s, 8))
    assert torch.equal(out[1], Q.softmax_int(x[1], -1, m, s, 8))  # nothing masked: plain softmax_int


def test_no_mask_is_softmax_int_and_the_fake_kernel_agrees():
    x = torch.randint(-127, 128, (3, 9), generator=torch.Generator().manual_seed(1)).to(torch.int8)
    m, s = dyadic(exp_input_ratio(0.02), m_bits=exp_m_bits(8))
    none = torch.zeros(3, 9, dtype=torch.bool)
    assert torch.equal(Q.masked_softmax_int(x, none, -1, m, s, 8), Q.softmax_int(x, -1, m, s, 8))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx, fm = mode.from_tensor(x), mode.from_tensor(none)
        out = Q.masked_softmax_int(fx, fm, -1, m, s, 16)
    assert out.shape == x.shape and out.dtype == torch.int16
