"""qpipe.conv2d_acc / conv2d_rq against naive Python integer loops (exact), ties and saturation included."""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import qpipe.ir.ops  # noqa: F401  (registers torch.ops.qpipe.*)
from test_integer_kernels import int8_values, nest, ref_requant, requant_params

Q = torch.ops.qpipe
FAST = settings(max_examples=80, deadline=None, database=None)


def ref_conv2d(x, w, bias, stride, padding, dilation, groups):
    """Naive integer conv2d over nested lists: x[n][ci][h][w], w[co][ci_g][kh][kw]; Python ints, no floats."""
    n_batch, c_in, height, width = len(x), len(x[0]), len(x[0][0]), len(x[0][0][0])
    c_out, c_in_g, kh, kw = len(w), len(w[0]), len(w[0][0]), len(w[0][0][0])
    c_out_g = c_out // groups
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = []
    for n in range(n_batch):
        planes = []
        for co in range(c_out):
            g = co // c_out_g
            plane = []
            for i in range(out_h):
                row = []
                for j in range(out_w):
                    total = 0 if bias is None else bias[co]
                    for ci in range(c_in_g):
                        for a in range(kh):
                            for b in range(kw):
                                y = i * stride[0] + a * dilation[0] - padding[0]
                                z = j * stride[1] + b * dilation[1] - padding[1]
                                if 0 <= y < height and 0 <= z < width:
                                    total += w[co][ci][a][b] * x[n][g * c_in_g + ci][y][z]
                    row.append(total)
                plane.append(row)
            planes.append(plane)
        out.append(planes)
    return out


@st.composite
def conv2d_case(draw):
    batch = draw(st.integers(1, 2))
    c_in = draw(st.integers(1, 4))
    c_out = draw(st.integers(1, 4))
    groups = draw(st.sampled_from([g for g in range(1, 5) if c_in % g == 0 and c_out % g == 0]))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    padding = [draw(st.integers(0, 2)), draw(st.integers(0, 2))]
    dilation = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    height, width = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    assume(height + 2 * padding[0] - dilation[0] * (kh - 1) - 1 >= 0)
    assume(width + 2 * padding[1] - dilation[1] * (kw - 1) - 1 >= 0)
    x = nest(draw(int8_values(batch * c_in * height * width)), (batch, c_in, height, width))
    w = nest(draw(int8_values(c_out * (c_in // groups) * kh * kw)), (c_out, c_in // groups, kh, kw))
    bias = draw(st.one_of(st.none(), st.lists(st.integers(-(2**30), 2**30), min_size=c_out, max_size=c_out)))
    return x, w, bias, stride, padding, dilation, groups


def _tensors(x, w, bias):
    return (torch.tensor(x, dtype=torch.int8), torch.tensor(w, dtype=torch.int8),
            None if bias is None else torch.tensor(bias, dtype=torch.int32))


EXTREME = ([[[[127] * 5] * 5] * 4] * 2, [[[[127] * 3] * 3] * 4] * 4, [2**30] * 4, [1, 1], [2, 2], [1, 1], 1)
NEG = ([[[[-128] * 5] * 5] * 4], [[[[-128] * 3] * 3] * 4] * 4, [-(2**30)] * 4, [2, 1], [1, 2], [2, 1], 1)
DEPTHWISE = ([[[[-127] * 6] * 6] * 4], [[[[127] * 3] * 3]] * 4, None, [2, 2], [1, 1], [1, 1], 4)


@FAST
@given(case=conv2d_case())
@example(case=EXTREME)
@example(case=NEG)
@example(case=DEPTHWISE)
def test_conv2d_acc_matches_python_loops(case):
    x, w, bias, stride, padding, dilation, groups = case
    xt, wt, bt = _tensors(x, w, bias)
    out = Q.conv2d_acc(xt, wt, bt, stride, padding, dilation, groups, 32)
    assert out.dtype == torch.int32
    assert out.tolist() == ref_conv2d(x, w, bias, stride, padding, dilation, groups)


@FAST
@given(case=conv2d_case(), data=st.data())
@example(case=EXTREME, data=None)
def test_conv2d_rq_equals_exact_requant_of_acc(case, data):
    x, w, bias, stride, padding, dilation, groups = case
    c_out = len(w)
    if data is None:  # a tie-heavy, saturating case: every acc * 2**30 / 2**31 lands on .5 or beyond the range
        ms, ss, bits, lo, hi = [2**30] * c_out, [31] * c_out, 8, -127, 127
    else:
        ms, ss, bits, lo, hi = data.draw(requant_params(c_out))
    xt, wt, bt = _tensors(x, w, bias)
    out = Q.conv2d_rq(xt, wt, bt, torch.tensor(ms), torch.tensor(ss), stride, padding, dilation, groups, lo, hi, bits)
    assert out.dtype == {8: torch.int8, 16: torch.int16}[bits]
    acc = ref_conv2d(x, w, bias, stride, padding, dilation, groups)
    expected = [[[[ref_requant(v, ms[co % len(ms)], ss[co % len(ss)], lo, hi) for v in row] for row in plane]
                 for co, plane in enumerate(planes)] for planes in acc]
    assert out.tolist() == expected


def test_conv2d_acc_fake_kernel_shape():
    x = torch.empty(2, 1, 33, 80, dtype=torch.int8, device="meta")
    w = torch.empty(8, 1, 3, 3, dtype=torch.int8, device="meta")
    out = Q.conv2d_acc(x, w, None, [2, 2], [1, 1], [1, 1], 1, 32)
    assert out.shape == (2, 8, 17, 40) and out.dtype == torch.int32
