"""torch-int8: the fast program is bit-exact with the qpipe:: reference kernels.

Random layers (hypothesis over shapes, groups, strides, dilations, padding, bit
widths and requant pairs) against the reference ops, with and without the C++
kernels; a whole tiny model through the target's folder; the QuartzNets (slow).

Inputs are int8 codes over the full signed range [-128, 127] or uint8 codes
[0, 255] (a ReLU's output); clamps are [-128, 127], [0, 127] (int8 out) or
[0, 255] (uint8 out), and 16-bit ones; the output dtype is the reference's
(``dtype_for_range``).
"""
from __future__ import annotations

import collections
import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import qpipe.ir.ops  # noqa: F401
from conftest import FAST_PIPELINE, TinyASR
from qpipe.backends._torch_int8 import cpu, cpu_ext
from qpipe.backends._torch_int8.cuda import CudaAddRequant, CudaConv1d, CudaLinear, CudaRequant, triton_available
from qpipe.backends.torch_int8 import MODEL_FILE, check_device, program_from_graph
from qpipe.ir.errors import QpipeError
from qpipe.ir.ops.kernels import dtype_for_range

EXT = cpu_ext.get()
EXTS = [pytest.param(EXT, id="c++"), pytest.param(None, id="torch")] if EXT is not None else [pytest.param(None, id="torch")]
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


CLAMPS = {8: [(-128, 127), (0, 255), (0, 127), (-127, 127)], 16: [(-32768, 32767), (0, 32767)]}


def _rq_args(draw, c: int, f32: bool = False):
    """Requant arguments; ``f32``: the (m, s) pairs a float32 multiplier stands for, as the pass writes them."""
    per_channel = draw(st.booleans())
    n = c if per_channel else 1
    if f32:
        from qpipe.ir.ops.kernels import f32_multiplier

        pairs = [f32_multiplier(r) for r in draw(st.lists(st.floats(1e-7, 0.5), min_size=n, max_size=n))]
        m, s = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    else:
        m = torch.tensor(draw(st.lists(st.integers(1, 2**31 - 1), min_size=n, max_size=n)), dtype=torch.int64)
        s = torch.tensor(draw(st.lists(st.integers(0, 45), min_size=n, max_size=n)), dtype=torch.int64)
    bits = draw(st.sampled_from([8, 8, 16]))
    lo, hi = draw(st.sampled_from(CLAMPS[bits]))
    return dict(m=m, s=s, lo=lo, hi=hi, bits=bits)


def _codes(draw, shape, g: torch.Generator) -> torch.Tensor:
    """8-bit activations as the program sees them: int8 [-128, 127] (extremes likely) or uint8 [0, 255]."""
    kind = draw(st.sampled_from(["int8", "uint8", "int8-extremes", "uint8-extremes"]))
    if kind.startswith("uint8"):
        x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        ends = (0, 255)
    else:
        x = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
        ends = (-128, 127)
    if kind.endswith("extremes"):  # the codes that overflow a wrong bound or a wrong sign
        pick = torch.randint(0, 3, shape, generator=g)
        x = torch.where(pick == 0, torch.full_like(x, ends[0]), torch.where(pick == 1, torch.full_like(x, ends[1]), x))
    return x


def _x_unsigned(draw, x: torch.Tensor) -> bool:
    """What the plan would tell the kernel: the input's sign, or (a kernel built without it) False."""
    return x.dtype == torch.uint8 and draw(st.booleans())


@st.composite
def conv1d_layers(draw):
    kind = draw(st.sampled_from(["depthwise", "pointwise", "dense", "grouped"]))
    g = draw(st.integers(1, 3))
    ci = draw(st.integers(1, 6)) * (g if kind == "grouped" else 1)
    if kind == "depthwise":
        co, groups = ci * draw(st.sampled_from([1, 1, 2])), ci
    elif kind == "grouped":
        co, groups = g * draw(st.integers(1, 4)), g
    else:
        co, groups = draw(st.integers(1, 20)), 1
    k = 1 if kind == "pointwise" else draw(st.integers(1, 9))
    stride = 1 if kind == "pointwise" else draw(st.integers(1, 3))
    dil = draw(st.integers(1, 3))
    pad = 0 if kind == "pointwise" else draw(st.integers(0, 5))
    t = draw(st.integers(max(1, dil * (k - 1) + 1 - 2 * pad), 40))
    b = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    g_ = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (co, ci // groups, k), generator=g_, dtype=torch.int8)
    bias = torch.randint(-(2**20), 2**20, (co,), generator=g_, dtype=torch.int32) if draw(st.booleans()) else None
    x = _codes(draw, (b, ci, t), g_)
    layout = draw(st.sampled_from(["cf", "cl"]))
    if layout == "cl":  # the program's own storage: (B, T, C) viewed as (B, C, T)
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    if draw(st.booleans()):  # weights at the extremes of their symmetric range
        w = torch.where(torch.rand(w.shape, generator=g_) < 0.5, torch.full_like(w, 127), torch.full_like(w, -127))
    args = dict(w=w, bias=bias, stride=[stride], padding=[pad], dilation=[dil], groups=groups, **_rq_args(draw, co))
    args["x_unsigned"] = _x_unsigned(draw, x)
    return x, args


def _reference(op, x, a):
    return op(x, a["w"], a["bias"], a["m"], a["s"], a["stride"], a["padding"], a["dilation"], a["groups"], a["lo"], a["hi"], a["bits"])


@pytest.mark.parametrize("ext", EXTS)
@SETTINGS
@given(layer=conv1d_layers())
def test_conv1d_rq_is_bit_exact_with_the_reference(ext, layer):
    x, a = layer
    want = _reference(torch.ops.qpipe.conv1d_rq, x, a)
    assert want.dtype == dtype_for_range(a["bits"], a["lo"], a["hi"])
    k = cpu.Conv(ext, a, 8, fused=True, x_unsigned=a["x_unsigned"])
    got = k(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want), (k.kind, x.dtype)
    if k.can_emit_f32:  # the exact-fp32 hand-over carries the same integers (uint8 ones too)
        k.emit_f32 = True
        assert torch.equal(k(x), want.to(torch.float32)), (k.kind, x.dtype)


@pytest.mark.parametrize("ext", EXTS)
@SETTINGS
@given(data=st.data())
def test_dilated_conv1d_runs_as_undilated_phases_and_stays_exact(ext, data):
    """QuartzNet's dilated depthwise layer (k=87, dilation 2) runs as d undilated convs over the time phases
    (the fp32 path, so without the integer depthwise kernels)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "avx2_ok", lambda ext: False)
        _check_dilation_phases(ext, data)


def _check_dilation_phases(ext, data) -> None:
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    d, k = data.draw(st.integers(2, 4)), data.draw(st.integers(2, 9))  # k = 1: a pointwise GEMM
    c = data.draw(st.integers(1, 24))
    groups = data.draw(st.sampled_from([1, c]))
    co = c if groups == c else data.draw(st.integers(1, 12))
    q = data.draw(st.integers(0, k))  # padding d*q: 'same' for q = (k-1)/2, shorter or longer otherwise
    t = data.draw(st.integers(max(1, d * (k - 1) + 1 - 2 * d * q), 41))  # any t, a multiple of d or not
    b = data.draw(st.integers(1, 3))
    x = _codes(data.draw, (b, c, t), g).transpose(1, 2).contiguous().transpose(1, 2)  # channels-last storage
    w = torch.randint(-127, 128, (co, c // groups, k), generator=g, dtype=torch.int8)
    bias = torch.randint(-(2**20), 2**20, (co,), generator=g, dtype=torch.int32) if data.draw(st.booleans()) else None
    a = dict(w=w, bias=bias, stride=[1], padding=[d * q], dilation=[d], groups=groups, **_rq_args(data.draw, co))
    k_rq = cpu.Conv(ext, a, 8, fused=True, x_unsigned=x.dtype == torch.uint8)
    if k_rq.kind == "dw-vnni":  # a depthwise layer where the C++ kernels have AVX-512 VNNI: dilation in the kernel
        assert ext is not None and groups == c == co
    else:
        assert k_rq.kind == "f32-conv-cl" and k_rq.phases == d
    want = _reference(torch.ops.qpipe.conv1d_rq, x, a)
    got = k_rq(x)
    assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)
    assert got.transpose(1, 2).is_contiguous()  # channels-last out, as every other convolution
    a_acc = dict(w=w, bias=bias, stride=[1], padding=[d * q], dilation=[d], groups=groups, acc_bits=32)
    want = torch.ops.qpipe.conv1d_acc(x, w, bias, [1], [d * q], [d], groups, 32)
    assert torch.equal(cpu.Conv(ext, a_acc, 8, fused=False)(x), want)


@pytest.mark.parametrize("ext", EXTS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize("lo,hi", [(-128, 127), (0, 255), (0, 127)])
def test_pointwise_and_depthwise_at_the_extreme_codes(ext, dtype, lo, hi):
    """All inputs at max|x| (128 for int8, 255 for uint8) and weights at +-127: the bound's worst case."""
    c, t = 64, 24
    x = torch.full((2, c, t), -128 if dtype == torch.int8 else 255, dtype=dtype)
    x[:, ::3] = 127 if dtype == torch.int8 else 0
    x = x.transpose(1, 2).contiguous().transpose(1, 2)
    for groups, k, pad in ((1, 1, 0), (c, 5, 2), (1, 3, 1)):
        w = torch.full((c, c // groups, k), 127, dtype=torch.int8)
        w[1::2] = -127
        w[:, :, ::2] = -w[:, :, ::2]
        bias = torch.arange(c, dtype=torch.int32) * 1000 - 30000
        a = dict(w=w, bias=bias, stride=[1], padding=[pad], dilation=[1], groups=groups,
                 m=torch.tensor([1 << 20]), s=torch.tensor([30]), lo=lo, hi=hi, bits=8)
        want = _reference(torch.ops.qpipe.conv1d_rq, x, a)
        for unsigned in {False, dtype == torch.uint8}:
            kern = cpu.Conv(ext, a, 8, fused=True, x_unsigned=unsigned)
            got = kern(x)
            assert got.dtype == want.dtype and torch.equal(got, want), (kern.kind, groups, unsigned)
        # the unfused accumulator, and a linear on the same codes
        acc = torch.ops.qpipe.conv1d_acc(x, w, bias, [1], [pad], [1], groups, 32)
        assert torch.equal(cpu.Conv(ext, dict(a, acc_bits=32), 8, fused=False)(x), acc), groups
    w = torch.full((40, c), 127, dtype=torch.int8)
    w[::2] = -127
    xl = x.transpose(1, 2)
    want = torch.ops.qpipe.linear_rq(xl, w, None, torch.tensor([1 << 20]), torch.tensor([28]), lo, hi, 8)
    got = cpu.Linear(ext, dict(w=w, bias=None, m=torch.tensor([1 << 20]), s=torch.tensor([28]), lo=lo, hi=hi, bits=8), 8,
                     fused=True, x_unsigned=dtype == torch.uint8)(xl)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_a_uint8_call_past_the_fp32_bound_takes_float64():
    """sum|w| * 128 < 2**24 <= sum|w| * 255: fp32 for int8 codes, but a uint8 input must not round."""
    ci, k = 286, 3
    w = torch.full((2, ci, k), 127, dtype=torch.int8)  # sum|w| = 286 * 3 * 127 = 108966: * 128 < 2**24 <= * 255
    a = dict(w=w.contiguous(), bias=None, stride=[1], padding=[1], dilation=[1], groups=1,
             m=torch.tensor([1]), s=torch.tensor([0]), lo=-32768, hi=32767, bits=16)
    kern = cpu.Conv(None, a, 8, fused=True)
    assert kern.kind == "f32-conv-cl" and kern.bound_u8 >= cpu.F32_EXACT > kern.bound
    x = torch.full((1, ci, 9), 255, dtype=torch.uint8)
    x[:, :, 4] = 254
    acc = torch.ops.qpipe.conv1d_acc(x, a["w"], None, [1], [1], [1], 1, 32)
    assert int(acc.abs().max()) >= cpu.F32_EXACT  # an fp32 sum could round here
    assert torch.equal(cpu.Conv(None, dict(a, acc_bits=32), 8, fused=False)(x), acc)
    assert cpu.Conv(None, a, 8, fused=True, x_unsigned=True).kind == "f64-conv"


@pytest.mark.parametrize("ext", EXTS)
def test_conv1d_beyond_fp32_exactness_takes_float64_and_stays_exact(ext):
    """sum|w| * 128 >= 2**24: an fp32 convolution could round, so the kernel must not use it."""
    g = torch.Generator().manual_seed(3)
    w = torch.full((4, 80, 15), 127, dtype=torch.int8)
    w[:, ::2] = -127
    a = dict(w=w, bias=None, stride=[1], padding=[7], dilation=[1], groups=1,
             m=torch.tensor([1 << 30]), s=torch.tensor([40]), lo=-32767, hi=32767, bits=16)
    x = torch.randint(-128, 128, (2, 80, 33), generator=g, dtype=torch.int8)
    x[:, ::2] = -128
    x[:, 1::2] = 127
    k = cpu.Conv(ext, a, 8, fused=True)
    assert k.kind == "f64-conv" and k.bound >= cpu.F32_EXACT
    assert torch.equal(k(x), _reference(torch.ops.qpipe.conv1d_rq, x, a))


@pytest.mark.parametrize("ext", EXTS)
@SETTINGS
@given(data=st.data())
def test_conv1d_acc_conv2d_rq_linear_rq_are_bit_exact(ext, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    b, ci, co = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 12)), data.draw(st.integers(1, 24))
    # linear over the last dim (m > 16 rows, and m <= 16: _int_mm needs padding)
    rows = data.draw(st.integers(1, 40))
    x = _codes(data.draw, (b, rows, ci), g)
    w = torch.randint(-127, 128, (co, ci), generator=g, dtype=torch.int8)
    bias = torch.randint(-1000, 1000, (co,), generator=g, dtype=torch.int32)
    rq = _rq_args(data.draw, co)
    want = torch.ops.qpipe.linear_rq(x, w, bias, rq["m"], rq["s"], rq["lo"], rq["hi"], rq["bits"])
    got = cpu.Linear(ext, dict(w=w, bias=bias, **rq), 8, fused=True, x_unsigned=_x_unsigned(data.draw, x))(x)
    assert got.dtype == want.dtype and torch.equal(got, want), x.dtype
    # linear accumulator (unfused), no bias
    want = torch.ops.qpipe.linear_acc(x, w, None, 32)
    assert torch.equal(cpu.Linear(ext, dict(w=w, bias=None, acc_bits=32), 8, fused=False)(x), want), x.dtype
    # conv1d accumulator (unfused)
    k = data.draw(st.integers(1, 5))
    x1 = _codes(data.draw, (b, ci, 20), g)
    w1 = torch.randint(-127, 128, (co, ci, k), generator=g, dtype=torch.int8)
    a1 = dict(w=w1, bias=bias, stride=[1], padding=[k // 2], dilation=[1], groups=1, acc_bits=32)
    want = torch.ops.qpipe.conv1d_acc(x1, w1, bias, [1], [k // 2], [1], 1, 32)
    assert torch.equal(cpu.Conv(ext, a1, 8, fused=False, x_unsigned=_x_unsigned(data.draw, x1))(x1), want), x1.dtype
    # conv2d (NCHW) with strides
    s2 = [data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))]
    x2 = _codes(data.draw, (b, ci, 9, 11), g)
    w2 = torch.randint(-127, 128, (co, ci, 3, 3), generator=g, dtype=torch.int8)
    a2 = dict(w=w2, bias=bias, stride=s2, padding=[1, 1], dilation=[1, 1], groups=1, **rq)
    want = _reference(torch.ops.qpipe.conv2d_rq, x2, a2)
    got = cpu.Conv(ext, a2, 8, fused=True, x_unsigned=_x_unsigned(data.draw, x2))(x2)
    assert got.dtype == want.dtype and torch.equal(got, want), x2.dtype


@pytest.mark.parametrize("ext", EXTS + [pytest.param("cuda", id="cuda-kernels")])
@SETTINGS
@given(data=st.data())
@example(data=None)
def test_add_requant_is_bit_exact_including_ties_and_saturation(ext, data):
    """The C++ add, its torch fallback, and the CUDA path's (Triton's, interpreted without a GPU)."""
    if ext == "cuda":
        _skip_unless_triton_can_run()
    bits = 8
    if data is None:  # ties: (a*ma + b*mb) exactly k + 1/2 after the shift, and saturation both ways
        a = torch.tensor([[[1, -1, 127, -128, 3, -128]]], dtype=torch.int8)
        b = torch.tensor([[[0, 0, 127, -128, -3, 127]]], dtype=torch.int8)
        ma, mb, s, lo, hi = torch.tensor(1 << 29), torch.tensor(1 << 30), torch.tensor(30), -128, 127
    else:
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
        shape = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 9)), data.draw(st.integers(1, 30)))
        a = _codes(data.draw, shape, g)  # each side int8 or uint8 (a ReLU output meets a residual)
        b = _codes(data.draw, shape, g)
        ma, mb = (torch.tensor(data.draw(st.integers(1, 2**31 - 1))) for _ in range(2))
        s = torch.tensor(data.draw(st.integers(0, 40)))
        bits = data.draw(st.sampled_from([8, 8, 8, 16]))
        lo, hi = data.draw(st.sampled_from(CLAMPS[bits]))
        if data.draw(st.booleans()):
            a, b = (v.transpose(1, 2).contiguous().transpose(1, 2) for v in (a, b))
    want = torch.ops.qpipe.add_requant(a, b, ma, mb, s, lo, hi, bits)
    args = dict(ma=ma, mb=mb, s=s, lo=lo, hi=hi, bits=bits)
    k = CudaAddRequant(args) if ext == "cuda" else cpu.AddRequant(ext, args)
    got = k(a, b)
    assert got.dtype == want.dtype and torch.equal(got, want), (a.dtype, b.dtype, lo, hi)
    assert got.transpose(1, 2).is_contiguous() == a.transpose(1, 2).is_contiguous()  # the layout the inputs share


@pytest.mark.skipif(EXT is None, reason="the C++ kernels did not build here")
@pytest.mark.parametrize("dtypes", [(torch.int8, torch.int8), (torch.uint8, torch.int8), (torch.int8, torch.uint8),
                                    (torch.uint8, torch.uint8)])
def test_add_requant_over_whole_layers_is_bit_exact(dtypes):
    """A 15x5-sized residual (8 x 401 x 192): the 32-wide int32 limb loop and the 16-wide double loop, their
    tails and both threads' halves, with ties (an odd code times 2**29 >> 30), saturation, every output width,
    and multipliers past 2**53 / 255 (the int64 loop)."""
    g = torch.Generator().manual_seed(7)
    shape = (8, 401, 192)
    a, b = (torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) if d == torch.uint8 else
            torch.randint(-128, 128, shape, generator=g, dtype=torch.int8) for d in dtypes)
    cases = [(1 << 29, 1 << 30, 30, -128, 127, 8), (1 << 29, 1 << 30, 30, 0, 255, 8),
             (1_500_000_001, 700_000_003, 31, -32768, 32767, 16), (12345, 54321, 10, -128, 127, 8),
             (1 << 50, 3 << 47, 52, -128, 127, 8), (1, 1, 0, -127, 127, 8),
             # the int32 limb path (16 <= s <= 46) at its edges: s = 16 (half in the low limb), s = 46, a low
             # limb at -2**15, a negative multiplier, and a high limb past int16 (the double path instead)
             (70_000, 90_001, 16, -128, 127, 8), ((1 << 30) + 12345, 3, 46, -128, 127, 8),
             ((7 << 16) + 32768, (5 << 16) - 32768, 20, 0, 255, 8), (-5_000_000, 7_000_000, 24, -32768, 32767, 16),
             ((1 << 31) - 1, (1 << 31) - 20_000, 31, -128, 127, 8)]
    for ma, mb, s, lo, hi, bits in cases:
        ma, mb, s = torch.tensor(ma), torch.tensor(mb), torch.tensor(s)
        want = torch.ops.qpipe.add_requant(a, b, ma, mb, s, lo, hi, bits)
        got = cpu.AddRequant(EXT, dict(ma=ma, mb=mb, s=s, lo=lo, hi=hi, bits=bits))(a, b)
        assert got.dtype == want.dtype and torch.equal(got, want), (int(ma), int(mb), int(s), lo, hi)
        if triton_available() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET")):
            k = CudaAddRequant(dict(ma=ma, mb=mb, s=s, lo=lo, hi=hi, bits=bits))
            got = k(a[:2], b[:2])  # two of the eight (Triton's interpreter is slow), the same loop
            assert k.triton and torch.equal(got, want[:2]), ("cuda", int(ma), int(mb), int(s), lo, hi)


@pytest.fixture(scope="module")
def tiny_int(tmp_path_factory):
    """TinyASR through the fast pipeline, written as a torch-int8 folder: (QuantizeResult, folder)."""
    from qpipe.api import quantize
    from qpipe.frontends.torch import from_module

    torch.manual_seed(0)
    fm = from_module(TinyASR().eval(), (torch.randn(2, 8, 32),))
    out = str(tmp_path_factory.mktemp("ti8") / "out")
    return quantize(fm, FAST_PIPELINE, output=out, target="torch-int8", progress=False), out


def test_folder_round_trip_is_bit_exact_and_loads_with_weights_only(tiny_int):
    from qpipe.backends import open_folder

    result, out = tiny_int
    plan = torch.load(os.path.join(out, MODEL_FILE), weights_only=True)  # plain data, no pickled code
    assert plan["format"].startswith("qpipe-torch-int8-plan/")
    qm = open_folder(out)
    assert qm.meta["target"] == "torch-int8"
    kinds = collections.Counter(qm.runner.program.kernels.values())
    assert any(k.startswith(("pw-vnni", "pw-avx2", "onednn-qlinear", "int_mm", "f32-matmul")) for k in kinds), kinds  # the pointwise convs are GEMMs
    assert any(k.startswith("f32-conv-cl") for k in kinds), kinds  # depthwise + the k=3 conv
    g = torch.Generator().manual_seed(1)
    for b, t in ((1, 32), (3, 57), (2, 200)):
        x = torch.randn(b, 8, t, generator=g) * 2
        with torch.no_grad():
            want = result.gm(x)
        got = qm.logits_int(x)
        assert got.dtype == want.dtype and torch.equal(got, want), (b, t)


def test_the_program_without_cpp_kernels_is_the_same(tiny_int):
    result, _ = tiny_int
    x = torch.randn(2, 8, 45, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = result.gm(x)
    prog = program_from_graph(result.gm, use_ext=False)
    assert all("c++" not in k for k in prog.kernels.values())
    assert torch.equal(prog(x), want)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_clear_line(tiny_int):
    with pytest.raises(QpipeError) as err:
        check_device("cuda")
    assert "CUDA" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(QpipeError):
        program_from_graph(tiny_int[0].gm, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA on this machine (tools/bench/torch_int8_cuda_check.py runs where there is)")
def test_cuda_program_is_bit_exact(tiny_int):
    result, _ = tiny_int
    x = torch.randn(3, 8, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = result.gm(x)
    graphed = program_from_graph(result.gm, device="cuda")
    assert graphed.mode == "cuda graph"
    assert torch.equal(graphed(x).cpu(), want) and not graphed.graphs  # a shape's first call runs eagerly
    assert torch.equal(graphed(torch.zeros_like(x)).cpu(), result.gm(torch.zeros_like(x)))  # its second captures
    assert torch.equal(graphed(x).cpu(), want) and len(graphed.graphs) == 1  # then replays, with new input
    assert torch.equal(program_from_graph(result.gm, device="cuda", cuda_graphs=False)(x).cpu(), want)
    x2 = torch.randn(1, 8, 40)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(graphed(x2).cpu(), result.gm(x2))
    assert len(graphed.graphs) == 2


def test_cuda_int_mm_hands_cublaslt_a_column_major_weight():
    """int8 tensor cores take K-major operands only: a row-major (K, N) weight is CUBLAS_STATUS_NOT_SUPPORTED on
    an H200 (torch 2.11, CUDA 13). The weight must reach ``_int_mm`` as a column-major view, padded to multiples of 8."""
    from qpipe.backends._torch_int8.cuda import CudaIntMM

    w = torch.randint(-128, 128, (13, 21), dtype=torch.int8)
    mm = CudaIntMM(w, "cpu")
    assert mm.wt.shape == (24, 16) and mm.wt.t().is_contiguous() and not mm.wt.is_contiguous()
    x = torch.randint(-128, 128, (5, 21), dtype=torch.int8)
    assert torch.equal(mm(x), x.to(torch.int32) @ w.t().to(torch.int32))


def test_cuda_graph_capture_failure_runs_eagerly_and_says_so(tiny_int):
    """A program that cannot be captured (here: no CUDA at all) still answers, eagerly, and ``mode`` says why."""
    from qpipe.backends._torch_int8.cuda_graph import CudaGraphed

    if torch.cuda.is_available():
        pytest.skip("capture works here")
    result, _ = tiny_int
    prog = program_from_graph(result.gm)
    graphed = CudaGraphed(prog)
    x = torch.randn(2, 8, 45, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(graphed(x), result.gm(x))
        assert graphed.mode == "cuda graph"  # a shape's first call runs eagerly, before any capture
        assert torch.equal(graphed(x), result.gm(x))  # the second tries to capture
    assert graphed.mode.startswith("eager (CUDA graph capture failed: ") and "\n" not in graphed.mode
    assert not graphed.graphs


def _as_f32(data, a: dict) -> dict:
    """The layer's requant as the float32-faithful one (``f32=True``): the (m, s) pairs of drawn float32 ratios."""
    from qpipe.ir.ops.kernels import f32_multiplier

    n = a["m"].numel()
    pairs = [f32_multiplier(r) for r in data.draw(st.lists(st.floats(1e-7, 0.5), min_size=n, max_size=n))]
    return dict(a, m=torch.tensor([p[0] for p in pairs]), s=torch.tensor([p[1] for p in pairs]), f32=True)


def _skip_unless_triton_can_run() -> None:
    if triton_available() and not torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("Triton kernels cannot run on CPU tensors without TRITON_INTERPRET=1 (tests/conftest.py sets it)")


def test_cuda_kernels_run_the_whole_program_bit_exactly_on_cpu_tensors(tiny_int):
    """The CUDA backend's kernel choices, the whole program, on CPU tensors (Triton's interpreted)."""
    _skip_unless_triton_can_run()
    result, _ = tiny_int
    prog = program_from_graph(result.gm, kernels="cuda")
    assert all(k.startswith("cuda") or k in ("reference", "clamp") for k in prog.kernels.values()), prog.kernels
    assert any("int_mm" in k for k in prog.kernels.values()), prog.kernels
    x = torch.randn(2, 8, 45, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = result.gm(x)
    assert torch.equal(prog(x), want)


@SETTINGS
@given(layer=conv1d_layers(), data=st.data())
def test_cuda_kernels_integer_logic_on_cpu_tensors(layer, data):
    """The CUDA path's kernels on CPU tensors, each layer with both requants: im2col + _int_mm, and the Triton
    depthwise conv and requant in Triton's interpreter where Triton is installed (the unfold fallback otherwise)."""
    _skip_unless_triton_can_run()
    x, dyadic = layer
    for f32, a in ((False, dyadic), (True, _as_f32(data, dyadic))):
        k = CudaConv1d(torch.device("cpu"), a, 8)
        if triton_available():
            assert k.rq.triton and k.kind != "unfold-int32-depthwise", k.kind
        got = k(x)
        want = torch.ops.qpipe.conv1d_rq(x, a["w"], a["bias"], a["m"], a["s"], a["stride"], a["padding"], a["dilation"],
                                         a["groups"], a["lo"], a["hi"], a["bits"], f32)
        assert got.dtype == want.dtype and torch.equal(got, want), (k.kind, x.dtype, f32)


def test_cuda_linear_and_requant_logic_on_cpu_tensors():
    _skip_unless_triton_can_run()
    from qpipe.ir.ops.kernels import f32_multiplier

    g = torch.Generator().manual_seed(5)
    w = torch.randint(-127, 128, (7, 13), generator=g, dtype=torch.int8)
    bias = torch.randint(-999, 999, (7,), generator=g, dtype=torch.int32)
    m, s = torch.randint(1, 2**31 - 1, (7,), generator=g), torch.randint(0, 40, (7,), generator=g)
    # three channels whose products end in exactly .5 (ties: half to even, not up), four drawn ratios
    ratios = [0.5, 0.25, 2.0 ** -7] + torch.rand(4, generator=g, dtype=torch.float64).mul(0.05).tolist()
    pairs = [f32_multiplier(r) for r in ratios]
    mf, sf = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    for x in (torch.randint(-128, 128, (2, 5, 13), generator=g, dtype=torch.int8),
              torch.randint(0, 256, (2, 5, 13), generator=g, dtype=torch.uint8)):
        for lo, hi in ((-128, 127), (0, 255)):
            for f32, (mm, ss) in ((False, (m, s)), (True, (mf, sf))):
                want = torch.ops.qpipe.linear_rq(x, w, bias, mm, ss, lo, hi, 8, f32)
                got = CudaLinear(torch.device("cpu"), dict(w=w, bias=bias, m=mm, s=ss, lo=lo, hi=hi, bits=8, f32=f32), 8)(x)
                assert got.dtype == want.dtype and torch.equal(got, want), (x.dtype, lo, hi, f32)
    assert CudaRequant(torch.device("cpu"), 7, None, m, s, 0, 255, 8).dtype == torch.uint8


@pytest.mark.parametrize("bits,lo,hi", [(8, -128, 127), (8, 0, 255), (16, -32768, 32767)])
def test_cuda_f32_requant_rounds_ties_to_even_and_saturates(bits, lo, hi):
    """The float32-faithful requant of the CUDA path (Triton's where installed) on the accumulators that
    decide it: exact ties (odd multiples of 2**(s-1) at a ratio of 2**-s), values one away from them,
    accumulators past 2**24 (the float32 cast rounds them), and both ends past the clamp."""
    _skip_unless_triton_can_run()
    from qpipe.ir.ops.kernels import f32_multiplier, requant_f32_reference

    g = torch.Generator().manual_seed(11)
    shifts = [1, 4, 10, 16]
    odd = torch.randint(-hi, hi, (64, len(shifts)), generator=g) * 2 + 1
    ties = odd * torch.tensor([1 << (s - 1) for s in shifts])
    wide = torch.randint(-(1 << 30), 1 << 30, (64, len(shifts)), generator=g)
    acc = torch.cat([ties, ties + 1, ties - 1, wide]).to(torch.int32)
    pairs = [f32_multiplier(2.0 ** -s) for s in shifts]
    m, s = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    rq = CudaRequant(torch.device("cpu"), len(shifts), None, m, s, lo, hi, bits, f32=True)
    assert rq.triton == triton_available()
    want = requant_f32_reference(acc, m, s, 1, lo, hi)
    got = rq(acc)
    assert got.dtype == rq.dtype and torch.equal(got.to(torch.int64), want), int((got.to(torch.int64) != want).sum())
    assert bool((want == lo).any() and (want == hi).any())  # the clamp was reached at both ends


@pytest.mark.slow
@pytest.mark.nemo
@pytest.mark.parametrize("model", ["demo", "quartznet_15x5"])
def test_quartznets_are_bit_exact_through_the_folder(model, tmp_path, request):
    from qpipe.api import load_model, quantize
    from qpipe.backends import open_folder

    if model == "demo":
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = str(tmp_path / "ti8")
        result = quantize(load_model(os.path.join(root, "models", "demo_quartznet.nemo")), FAST_PIPELINE, output=out,
                          target="torch-int8", progress=False)
    else:  # shared with the 15x5 integer-only test
        result, out = request.getfixturevalue("quartznet_15x5_torch_int8")
    qm = open_folder(out)
    g = torch.Generator().manual_seed(0)
    for b, t in ((1, 1601), (2, 803)):
        x = torch.randn(b, 64, t, generator=g)
        mult = int(qm.meta["input"]["time_multiple"] or 1)
        xt = x[:, :, : (t // mult) * mult].contiguous()
        with torch.no_grad():
            want = result.gm(xt)
        assert torch.equal(qm.logits_int(x), want), (model, b, t)
    if model == "demo" and (torch.cuda.is_available() or not triton_available() or os.environ.get("TRITON_INTERPRET")):
        # the CUDA kernels (Triton's, interpreted where there is no GPU: 4 s) on a short input: a QuartzNet's
        # depthwise layers, strides and residual adds through that path as well
        x = torch.randn(1, 64, 64, generator=g)
        with torch.no_grad():
            want = result.gm(x)
        prog = program_from_graph(result.gm, kernels="cuda")
        assert any("triton" in k or "depthwise" in k for k in prog.kernels.values()), prog.kernels
        assert torch.equal(prog(x), want)


@pytest.mark.parametrize("ext", EXTS)
@SETTINGS
@given(data=st.data())
@example(data=None)
def test_input_quantizer_is_bit_exact_including_exact_halves(ext, data):
    if data is None:  # quotients exactly on a half (half to even), the saturation ends (-128 too), -0.0, inf
        scale = 0.25
        x = torch.tensor([[[0.125, -0.125, 0.375, -0.375, 0.625, -0.625, 1e9, -1e9, -0.0, 31.875, -32.0, -32.125,
                            31.75, float("inf"), float("-inf"), -31.875]]], dtype=torch.float32)
    else:
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
        scale = data.draw(st.floats(1e-3, 0.5))
        shape = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 9)), data.draw(st.integers(1, 40)))
        x = torch.randn(shape, generator=g) * data.draw(st.floats(0.1, 5.0))
        if data.draw(st.booleans()):  # exact halves of the float32 scale: x = (k + 1/2) * scale
            s32 = torch.tensor(scale, dtype=torch.float32)
            k = torch.randint(-140, 140, shape, generator=g).to(torch.float32)
            x = torch.where(torch.rand(shape, generator=g) < 0.5, (k + 0.5) * s32, x)
    want = torch.ops.qpipe.quantize(x, scale, 8)
    assert int(want.min()) >= -128 and int(want.max()) <= 127
    k = cpu.Quantize(ext, dict(scale=scale, bits=8))
    got = k(x)
    assert got.dtype == want.dtype and torch.equal(got, want)
    if k.can_emit_f32:
        k.emit_f32 = True
        assert torch.equal(k(x), want.to(torch.float32))


@pytest.mark.skipif(EXT is None, reason="the C++ kernels did not build here")
def test_input_quantizer_over_a_whole_batch_is_bit_exact():
    """8 x 64 x 1601 features: whole 64-step tiles and the ragged last one, split between threads, with exact
    halves of the scale and saturation in every tile; 40 channels x 100 steps: the 16 x 16 transposed blocks
    with channels and times left over."""
    g = torch.Generator().manual_seed(3)
    for shape in ((8, 64, 1601), (2, 40, 100)):
        scale = 0.0371
        s32 = torch.tensor(scale, dtype=torch.float32)
        halves = (torch.randint(-140, 140, shape, generator=g).to(torch.float32) + 0.5) * s32
        x = torch.where(torch.rand(shape, generator=g) < 0.3, halves, torch.randn(shape, generator=g) * 3)
        want = torch.ops.qpipe.quantize(x, scale, 8)
        k = cpu.Quantize(EXT, dict(scale=scale, bits=8))
        got = k(x)
        assert got.dtype == want.dtype and torch.equal(got, want), shape
        assert int(want.min()) == -128 and int(want.max()) == 127
        if k.can_emit_f32:
            k.emit_f32 = True
            assert torch.equal(k(x), want.to(torch.float32)), shape


def test_the_reference_quantizer_is_onnx_quantize_linear():
    """The check behind the C++ quantizer: the reference divides in float32 (no reciprocal) and rounds half to even."""
    import numpy as np

    g = torch.Generator().manual_seed(7)
    for scale in (0.1, 0.037, 1 / 3, 0.0123456789):
        x = torch.randn(4096, generator=g) * 40 * scale
        s32 = np.float32(scale)
        want = np.clip(np.rint(x.numpy() / s32), -128, 127).astype(np.int8)
        assert np.array_equal(torch.ops.qpipe.quantize(x, scale, 8).numpy(), want), scale


@pytest.mark.parametrize("ext", EXTS)
def test_a_program_over_uint8_relu_outputs_is_bit_exact(ext):
    """A plan where ReLU outputs (uint8) feed a pointwise GEMM, a depthwise fp32 conv and a residual add."""
    from qpipe.backends._torch_int8.plan import FORMAT
    from qpipe.backends._torch_int8.program import Program

    g = torch.Generator().manual_seed(11)
    c = 24
    w_pw = torch.randint(-127, 128, (c, 8, 1), generator=g, dtype=torch.int8)
    w_dw = torch.randint(-127, 128, (c, 1, 5), generator=g, dtype=torch.int8)
    w_pw2 = torch.randint(-127, 128, (c, c, 1), generator=g, dtype=torch.int8)
    bias = torch.randint(-5000, 5000, (c,), generator=g, dtype=torch.int32)
    m, s = torch.tensor([1 << 20]), torch.tensor([27])
    conv = lambda w, groups, pad, lo, hi: dict(w={"tensor": w}, bias={"tensor": "b"}, m={"tensor": "m"}, s={"tensor": "s"},
                                               stride=[1], padding=[pad], dilation=[1], groups=groups, lo=lo, hi=hi, bits=8)
    steps = [
        {"out": "q", "fn": "qpipe.quantize", "args": {"x": {"ref": "x"}, "scale": 0.05, "bits": 8}, "dtype": "torch.int8"},
        {"out": "r1", "fn": "qpipe.conv1d_rq", "args": dict(conv("w_pw", 1, 0, 0, 255), x={"ref": "q"}), "dtype": "torch.uint8"},
        {"out": "r2", "fn": "qpipe.conv1d_rq", "args": dict(conv("w_dw", c, 2, 0, 255), x={"ref": "r1"}), "dtype": "torch.uint8"},
        {"out": "r3", "fn": "qpipe.conv1d_rq", "args": dict(conv("w_pw2", 1, 0, -128, 127), x={"ref": "r2"}), "dtype": "torch.int8"},
        {"out": "y", "fn": "qpipe.add_requant", "args": {"a": {"ref": "r3"}, "b": {"ref": "r1"}, "ma": {"tensor": "ma"},
                                                         "mb": {"tensor": "mb"}, "s": {"tensor": "sa"}, "lo": 0, "hi": 255, "bits": 8},
         "dtype": "torch.uint8"},
    ]
    tensors = {"w_pw": w_pw, "w_dw": w_dw, "w_pw2": w_pw2, "b": bias, "m": m, "s": s,
               "ma": torch.tensor(3 << 28), "mb": torch.tensor(5 << 27), "sa": torch.tensor(30)}
    plan = {"format": FORMAT, "input": "x", "steps": steps, "tensors": tensors, "output": [{"ref": "y"}]}
    x = torch.randn(2, 8, 50, generator=g) * 3
    env = {"x": x}
    for st_ in steps:
        a = {k: (env[v["ref"]] if isinstance(v, dict) and "ref" in v else tensors[v["tensor"]] if isinstance(v, dict) else v)
             for k, v in st_["args"].items()}
        env[st_["out"]] = getattr(torch.ops.qpipe, st_["fn"].split(".")[1])(**a)
    assert env["r1"].dtype == torch.uint8 and env["y"].dtype == torch.uint8 and int(env["r2"].max()) > 127
    prog = Program(plan, "cpu", use_ext=ext is not None)
    got = prog(x)
    assert got.dtype == torch.uint8 and torch.equal(got, env["y"]), prog.kernels


@pytest.mark.parametrize("ext", EXTS)
@pytest.mark.parametrize("gemm", ["chosen", "qlinear-shifted", "int_mm", "f32", "f64"])
@pytest.mark.parametrize("lo,hi", [(-128, 127), (0, 255)])
def test_every_gemm_takes_uint8_exactly(ext, gemm, lo, hi, monkeypatch):
    """A uint8 input on each GEMM: as it is (VNNI, oneDNN u8 x s8, f64) or shifted to x - 128 with the bias corrected."""
    if gemm != "chosen":  # a GEMM swapped in after the choice: the bias correction must be the non-VNNI one
        monkeypatch.setattr(cpu, "vnni_ok", lambda ext: False)
        monkeypatch.setattr(cpu, "avx2_ok", lambda ext: False)
    if gemm == "int_mm":  # built as an _int_mm kernel (its shift correction) even where _int_mm is slow
        monkeypatch.setattr(cpu, "int_mm_fast", lambda: True)
    g = torch.Generator().manual_seed(13)
    ci, co = 600, 24  # all-extreme weights: sum|w| * 128 < 2**24 <= sum|w| * 255 in the first channels
    w = torch.randint(-127, 128, (co, ci), generator=g, dtype=torch.int8)
    w[:4] = 127
    w[4:8] = -127
    bias = torch.randint(-9999, 9999, (co,), generator=g, dtype=torch.int32)
    m, s = torch.tensor([1 << 22]), torch.tensor([36])
    x = torch.randint(0, 256, (2, 30, ci), generator=g, dtype=torch.uint8)
    x[0, :5] = 255
    x[1, :5] = 0
    k = cpu.Linear(ext, dict(w=w, bias=bias, m=m, s=s, lo=lo, hi=hi, bits=8), 8, fused=True, x_unsigned=True)
    if gemm == "chosen" and cpu.vnni_ok(ext):
        assert k.kind == "pw-vnni", k.kind  # u8 x s8 on the codes as they are, exact below 2**31
    elif gemm == "chosen" and cpu.avx2_ok(ext):
        assert k.kind == "pw-avx2", k.kind  # the codes widened to int16 (vpmaddwd), exact below 2**31
    elif gemm == "chosen" and cpu.qlinear_ok():
        # 255 * sum|w| >= 2**24: shifted to int8, which oneDNN runs well on some CPUs only (else _int_mm)
        assert k.kind == ("onednn-qlinear" if cpu.qlinear_s8_fast() else "int_mm"), k.kind
        assert getattr(k.gemm, "takes_u8", False) is False
    elif gemm == "chosen":  # 255 * sum|w| >= 2**24: not fp32; _int_mm only where it has a real kernel
        assert k.kind == ("int_mm" if cpu.int_mm_fast() else "f64-matmul"), k.kind
    elif gemm == "qlinear-shifted":
        if not cpu.qlinear_ok():
            pytest.skip("no oneDNN int8 matmul on this CPU")
        k.gemm = cpu.QLinear(w)
    elif gemm == "int_mm":
        k.gemm = cpu.IntMM(w)
    elif gemm == "f64":
        k.gemm = cpu.F64MM(w)
    want = torch.ops.qpipe.linear_rq(x, w, bias, m, s, lo, hi, 8)
    got = k(x)
    assert got.dtype == want.dtype and torch.equal(got, want), gemm
    small = w[8:]  # 255 * sum|w| < 2**24: oneDNN takes the uint8 codes as they are
    k2 = cpu.Conv(ext, dict(w=small.unsqueeze(2), bias=None, stride=[1], padding=[0], dilation=[1], groups=1, m=m, s=s,
                            lo=lo, hi=hi, bits=8), 8, fused=True, x_unsigned=True)
    if gemm == "int_mm":
        k2.gemm = cpu.IntMM(small)
    elif gemm == "f32":  # exact here only (255 * sum|w| < 2**24): the uint8 codes as they are, in fp32
        k2.gemm = cpu.F32MM(small)
    elif gemm == "chosen" and not cpu.vnni_ok(ext) and cpu.avx2_ok(ext):
        assert k2.kind == "pw-avx2", k2.kind
    elif gemm == "chosen" and not cpu.vnni_ok(ext) and not cpu.qlinear_ok() and not cpu.int_mm_fast():
        assert k2.kind == "f32-matmul", k2.kind
    xc = x.transpose(1, 2)
    want = torch.ops.qpipe.conv1d_rq(xc, small.unsqueeze(2), None, m, s, [1], [0], [1], 1, lo, hi, 8)
    got = k2(xc)
    assert got.dtype == want.dtype and torch.equal(got, want), (gemm, k2.kind, getattr(k2.gemm, "takes_u8", None))


VNNI = EXT is not None and EXT.dw_vnni_available()
AVX2 = EXT is not None and hasattr(EXT, "pw_avx2_available") and EXT.pw_avx2_available()


@pytest.mark.skipif(not VNNI, reason="the C++ kernels have no AVX-512 VNNI here")
@SETTINGS
@given(data=st.data())
def test_vnni_depthwise_conv1d_is_bit_exact_fused_and_not(data):
    """``dw-vnni``: QuartzNet-sized depthwise layers (channels across 64-blocks, up to 90 taps, strides,
    dilations, paddings) on int8 / uint8 codes at the extremes, requantized in the kernel (``f32=True``),
    after it (dyadic), or left as accumulators; against the reference ops."""
    _check_depthwise(data, "dw-vnni")


@pytest.mark.skipif(not AVX2, reason="the C++ kernels have no AVX2 here")
@SETTINGS
@given(data=st.data())
def test_avx2_depthwise_conv1d_is_bit_exact_fused_and_not(data):
    """``dw-avx2`` (what a CPU without VNNI takes; forced on one with it): the VNNI test's layers, channels
    across its 16-channel blocks, odd tap counts (its tap pairs); against the reference ops."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "vnni_ok", lambda ext: False)
        _check_depthwise(data, "dw-avx2")


def _check_depthwise(data, kind: str) -> None:
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    c = data.draw(st.sampled_from([1, 5, 15, 16, 17, 63, 64, 65, 130]))
    k = data.draw(st.integers(1, 90))
    stride, dil = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    pad = data.draw(st.integers(0, dil * (k - 1) // 2 + 2))
    t = data.draw(st.integers(max(1, dil * (k - 1) + 1 - 2 * pad), 300))
    b = data.draw(st.integers(1, 2))
    x = _codes(data.draw, (b, c, t), g).transpose(1, 2).contiguous().transpose(1, 2)
    w = torch.randint(-127, 128, (c, 1, k), generator=g, dtype=torch.int8)
    if data.draw(st.booleans()):
        w = torch.where(w >= 0, torch.full_like(w, 127), torch.full_like(w, -127))
    bias = torch.randint(-(2**24), 2**24, (c,), generator=g, dtype=torch.int32) if data.draw(st.booleans()) else None
    geo = dict(w=w, bias=bias, stride=[stride], padding=[pad], dilation=[dil], groups=c)
    f32 = data.draw(st.booleans())
    rq = _rq_args(data.draw, c, f32=f32)
    a = dict(geo, **rq, f32=f32)
    want = torch.ops.qpipe.conv1d_rq(x, w, bias, a["m"], a["s"], [stride], [pad], [dil], c, a["lo"], a["hi"], a["bits"], f32)
    kern = cpu.Conv(EXT, a, 8, fused=True, x_unsigned=x.dtype == torch.uint8)
    if kind == "dw-avx2" and c == k == 1:  # one channel, one tap: a pointwise GEMM
        kind = "pw-avx2"
    assert kern.kind == kind and (kind != "dw-vnni" or kern.vnni_fused == f32)
    got = kern(x)
    assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), (c, k, stride, dil, pad, x.dtype)
    assert got.transpose(1, 2).is_contiguous()  # channels-last out
    acc = cpu.Conv(EXT, dict(geo, acc_bits=32), 8, fused=False)
    assert acc.kind == kind
    assert torch.equal(acc(x), torch.ops.qpipe.conv1d_acc(x, w, bias, [stride], [pad], [dil], c, 32))


@pytest.mark.skipif(not VNNI, reason="the C++ kernels have no AVX-512 VNNI here")
@SETTINGS
@given(data=st.data())
def test_vnni_pointwise_gemm_is_bit_exact_fused_and_not(data):
    """``pw-vnni``: pointwise convs and linears with rows, K and N off the kernel's 4-row, 4-byte and
    64-column blocks, int8 / uint8 codes at the extremes, requantized in the kernel (``f32=True``),
    after it (dyadic), or left as accumulators; against the reference ops."""
    _check_pointwise_gemm(data, "pw-vnni")


@pytest.mark.skipif(not AVX2, reason="the C++ kernels have no AVX2 here")
@SETTINGS
@given(data=st.data())
def test_avx2_pointwise_gemm_is_bit_exact_fused_and_not(data):
    """``pw-avx2`` (what a CPU without VNNI takes; forced on one with it): the same layers as the VNNI
    test, off its 6-row, 2-byte and 16-column blocks, at the extremes; against the reference ops."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "vnni_ok", lambda ext: False)
        _check_pointwise_gemm(data, "pw-avx2")


def _check_pointwise_gemm(data, kind: str) -> None:
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    k, n = data.draw(st.integers(1, 300)), data.draw(st.sampled_from([1, 7, 63, 64, 65, 130, 200]))
    b, t = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 70))
    x = _codes(data.draw, (b, k, t), g)
    if data.draw(st.booleans()):  # the program's own layout; else (B, C, T) storage, copied first
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    if data.draw(st.booleans()):
        w = torch.where(w >= 0, torch.full_like(w, 127), torch.full_like(w, -127))
    bias = torch.randint(-(2**24), 2**24, (n,), generator=g, dtype=torch.int32) if data.draw(st.booleans()) else None
    f32 = data.draw(st.booleans())
    rq = _rq_args(data.draw, n, f32=f32)
    geo = dict(w=w.unsqueeze(2), bias=bias, stride=[1], padding=[0], dilation=[1], groups=1)
    kc = cpu.Conv(EXT, dict(geo, **rq, f32=f32), 8, fused=True, x_unsigned=x.dtype == torch.uint8)
    want = torch.ops.qpipe.conv1d_rq(x, w.unsqueeze(2), bias, rq["m"], rq["s"], [1], [0], [1], 1, rq["lo"], rq["hi"],
                                     rq["bits"], f32)
    got = kc(x)
    assert kc.kind == ("dw-vnni" if k == n == 1 and cpu.vnni_ok(EXT) else kind), kc.kind  # one channel: depthwise too
    assert got.dtype == want.dtype and torch.equal(got, want), (k, n, x.dtype)
    assert got.transpose(1, 2).is_contiguous()  # channels-last out
    xl = x.transpose(1, 2)
    kl = cpu.Linear(EXT, dict(w=w, bias=bias, **rq, f32=f32), 8, fused=True, x_unsigned=x.dtype == torch.uint8)
    want = torch.ops.qpipe.linear_rq(xl, w, bias, rq["m"], rq["s"], rq["lo"], rq["hi"], rq["bits"], f32)
    assert kl.kind == kind and torch.equal(kl(xl), want), (k, n, x.dtype)
    acc = cpu.Linear(EXT, dict(w=w, bias=bias, acc_bits=32), 8, fused=False)
    assert torch.equal(acc(xl), torch.ops.qpipe.linear_acc(xl, w, bias, 32))


@pytest.mark.skipif(EXT is None, reason="no C++ kernels here")
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize("lo,hi", [(-128, 127), (0, 255), (-32768, 32767)])
def test_cpp_depthwise_kernel_takes_and_writes_uint8(dtype, lo, hi):
    """``dw_conv1d_rq`` (the C++ depthwise kernel, timed by tools/bench/torch_int8_kernels.py) on int8/uint8 codes."""
    g = torch.Generator().manual_seed(17)
    b, c, t, k, pad = 2, 20, 37, 5, 2
    x = torch.randint(-128, 128, (b, c, t), generator=g, dtype=torch.int8) if dtype == torch.int8 else \
        torch.randint(0, 256, (b, c, t), generator=g, dtype=torch.uint8)
    w = torch.randint(-127, 128, (c, 1, k), generator=g, dtype=torch.int8)
    bias = torch.randint(-5000, 5000, (c,), generator=g, dtype=torch.int32)
    m = torch.randint(1, 1 << 24, (c,), generator=g)
    s = torch.randint(10, 30, (c,), generator=g)
    bits = 16 if hi > 255 else 8
    want = torch.ops.qpipe.conv1d_rq(x, w, bias, m, s, [1], [pad], [1], c, lo, hi, bits)
    cp = -(-c // 16) * 16
    wp = torch.zeros(k, cp)
    wp[:, :c] = w[:, 0, :].t().float()
    half = torch.where(s > 0, torch.ones_like(s) << (s - 1).clamp_min(0), torch.zeros_like(s))
    got = EXT.dw_conv1d_rq(x.transpose(1, 2).contiguous(), wp, bias.to(torch.int64), m, half, s, 1, pad, 1, lo, hi,
                           cpu.out_code(want.dtype))
    assert got.dtype == want.dtype and torch.equal(got.transpose(1, 2), want)


@pytest.mark.parametrize("ext", EXTS)
@SETTINGS
@given(layer=conv1d_layers(), data=st.data())
def test_f32_requant_conv1d_and_linear_are_bit_exact(ext, layer, data):
    """``f32=True`` (float32-faithful requant, half to even): the C++ kernel and the torch one against the reference."""
    x, a = layer
    a = _as_f32(data, a)
    n = a["m"].numel()
    want = torch.ops.qpipe.conv1d_rq(x, a["w"], a["bias"], a["m"], a["s"], a["stride"], a["padding"], a["dilation"],
                                     a["groups"], a["lo"], a["hi"], a["bits"], True)
    k = cpu.Conv(ext, a, 8, fused=True, x_unsigned=a["x_unsigned"])
    got = k(x)
    assert got.dtype == want.dtype and torch.equal(got, want), (k.kind, x.dtype)
    if k.call_cl is not None:  # a program's 8-bit values stay (B, T, C) in memory: no copy before the next layer
        assert got.transpose(1, 2).is_contiguous(), (k.kind, got.stride())
    if k.can_emit_f32:
        k.emit_f32 = True
        assert torch.equal(k(x), want.to(torch.float32)), (k.kind, x.dtype)
    xl = x.transpose(1, 2)
    wl = torch.randint(-127, 128, (n if n > 1 else 5, xl.shape[-1]), generator=torch.Generator().manual_seed(n))
    wl = wl.to(torch.int8)
    m, s = a["m"], a["s"]
    if n > 1:
        wl = wl[:n]
    want = torch.ops.qpipe.linear_rq(xl, wl, None, m, s, a["lo"], a["hi"], a["bits"], True)
    got = cpu.Linear(ext, dict(w=wl, bias=None, m=m, s=s, lo=a["lo"], hi=a["hi"], bits=a["bits"], f32=True), 8, fused=True)(xl)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_a_killed_builds_lock_is_cleared_and_a_live_one_kept(tmp_path):
    """torch's builder would wait forever on the lock a killed build left; only a lock past any build's time goes."""
    import time
    import types

    fake = types.SimpleNamespace(_get_build_directory=lambda name, verbose: str(tmp_path / name))
    for name, age in (("old", cpu_ext._STALE_LOCK_S + 60), ("live", 5)):
        (tmp_path / name).mkdir()
        lock = tmp_path / name / "lock"
        lock.touch()
        os.utime(lock, (time.time() - age, time.time() - age))
        cpu_ext._clear_stale_lock(fake, name)
    assert not (tmp_path / "old" / "lock").exists() and (tmp_path / "live" / "lock").exists()


@pytest.mark.skipif(not VNNI, reason="the C++ kernels have no AVX-512 VNNI here")
@pytest.mark.parametrize("kind", ["pointwise", "depthwise"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
def test_vnni_epilogue_sums_in_int32_only_where_it_cannot_overflow(kind, dtype):
    """The fused VNNI epilogue adds the bias in int32 where ``255 * sum|w| + |bias| < 2**31`` (one
    vpaddd, one rounding to float32) and in double otherwise; a bias just past that bound, whose int32
    sum would wrap, and one of 2**40 take the double path and still give the reference's integers."""
    from qpipe.ir.ops.kernels import f32_multiplier

    g = torch.Generator().manual_seed(5)
    c, k = 40, (1 if kind == "pointwise" else 7)
    w = torch.full((c, c if kind == "pointwise" else 1, k), 127, dtype=torch.int8)  # large accumulators
    bound = 255 * int(w.to(torch.int64).abs().reshape(c, -1).sum(1).max())
    x = (torch.full((2, c, 50), 127 if dtype == torch.int8 else 255, dtype=dtype)
         .transpose(1, 2).contiguous().transpose(1, 2))
    m, s = f32_multiplier(2.0 ** -30)
    geo = dict(stride=[1], padding=[k // 2], dilation=[1], groups=1 if kind == "pointwise" else c)
    for big in (0, (1 << 31) - bound // 4, 1 << 40):  # the middle one: acc + bias passes 2**31 at these codes
        bias = torch.randint(-1000, 1000, (c,), generator=g, dtype=torch.int64) + big
        a = dict(w=w, bias=bias, m=torch.tensor([m]), s=torch.tensor([s]), lo=-128, hi=127, bits=8, f32=True, **geo)
        conv = cpu.Conv(EXT, a, 8, fused=True, x_unsigned=dtype == torch.uint8)
        assert conv.kind == ("pw-vnni" if kind == "pointwise" else "dw-vnni")
        want = torch.ops.qpipe.conv1d_rq(x, w, bias, a["m"], a["s"], geo["stride"], geo["padding"], geo["dilation"],
                                         geo["groups"], -128, 127, 8, True)
        got = conv(x)
        assert torch.equal(got, want), (big, int((got != want).sum()))
        taken = cpu.vnni_bias(conv.post.bias_shifted if dtype == torch.int8 else conv.post.bias,
                              255 * w.to(torch.int64).abs().reshape(c, -1).sum(1))
        assert taken.dtype == (torch.int32 if big == 0 else torch.int64), big
