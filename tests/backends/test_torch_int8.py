"""torch-int8: the fast program is bit-exact with the qpipe:: reference kernels.

Random layers (hypothesis over shapes, groups, strides, dilations, padding, bit
widths and requant pairs) against the reference ops, with and without the C++
kernels; a whole tiny model through the target's folder; the QuartzNets (slow).
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
from qpipe.backends._torch_int8.cuda import CudaConv1d, CudaLinear, CudaRequant, triton_available
from qpipe.backends.torch_int8 import MODEL_FILE, check_device, program_from_graph
from qpipe.ir.errors import QpipeError

EXT = cpu_ext.get()
EXTS = [pytest.param(EXT, id="c++"), pytest.param(None, id="torch")] if EXT is not None else [pytest.param(None, id="torch")]
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _rq_args(draw, c: int):
    per_channel = draw(st.booleans())
    n = c if per_channel else 1
    m = torch.tensor(draw(st.lists(st.integers(1, 2**31 - 1), min_size=n, max_size=n)), dtype=torch.int64)
    s = torch.tensor(draw(st.lists(st.integers(0, 45), min_size=n, max_size=n)), dtype=torch.int64)
    bits = draw(st.sampled_from([8, 16]))
    hi = (1 << (bits - 1)) - 1
    lo = draw(st.sampled_from([-hi, 0]))
    return dict(m=m, s=s, lo=lo, hi=hi, bits=bits)


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
    x = torch.randint(-127 if draw(st.booleans()) else -128, 128, (b, ci, t), generator=g_, dtype=torch.int8)
    layout = draw(st.sampled_from(["cf", "cl"]))
    if layout == "cl":  # the program's own storage: (B, T, C) viewed as (B, C, T)
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    args = dict(w=w, bias=bias, stride=[stride], padding=[pad], dilation=[dil], groups=groups, **_rq_args(draw, co))
    return x, args


def _reference(op, x, a):
    return op(x, a["w"], a["bias"], a["m"], a["s"], a["stride"], a["padding"], a["dilation"], a["groups"], a["lo"], a["hi"], a["bits"])


@pytest.mark.parametrize("ext", EXTS)
@SETTINGS
@given(layer=conv1d_layers())
def test_conv1d_rq_is_bit_exact_with_the_reference(ext, layer):
    x, a = layer
    want = _reference(torch.ops.qpipe.conv1d_rq, x, a)
    k = cpu.Conv(ext, a, 8, fused=True)
    got = k(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want), k.kind


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
    x = torch.randint(-128, 128, (b, rows, ci), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (co, ci), generator=g, dtype=torch.int8)
    bias = torch.randint(-1000, 1000, (co,), generator=g, dtype=torch.int32)
    rq = _rq_args(data.draw, co)
    want = torch.ops.qpipe.linear_rq(x, w, bias, rq["m"], rq["s"], rq["lo"], rq["hi"], rq["bits"])
    assert torch.equal(cpu.Linear(ext, dict(w=w, bias=bias, **rq), 8, fused=True)(x), want)
    # conv1d accumulator (unfused)
    k = data.draw(st.integers(1, 5))
    x1 = torch.randint(-128, 128, (b, ci, 20), generator=g, dtype=torch.int8)
    w1 = torch.randint(-127, 128, (co, ci, k), generator=g, dtype=torch.int8)
    a1 = dict(w=w1, bias=bias, stride=[1], padding=[k // 2], dilation=[1], groups=1, acc_bits=32)
    want = torch.ops.qpipe.conv1d_acc(x1, w1, bias, [1], [k // 2], [1], 1, 32)
    assert torch.equal(cpu.Conv(ext, a1, 8, fused=False)(x1), want)
    # conv2d (NCHW) with strides
    s2 = [data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))]
    x2 = torch.randint(-128, 128, (b, ci, 9, 11), generator=g, dtype=torch.int8)
    w2 = torch.randint(-127, 128, (co, ci, 3, 3), generator=g, dtype=torch.int8)
    a2 = dict(w=w2, bias=bias, stride=s2, padding=[1, 1], dilation=[1, 1], groups=1, **rq)
    want = _reference(torch.ops.qpipe.conv2d_rq, x2, a2)
    assert torch.equal(cpu.Conv(ext, a2, 8, fused=True)(x2), want)


@pytest.mark.parametrize("ext", EXTS)
@SETTINGS
@given(data=st.data())
@example(data=None)
def test_add_requant_is_bit_exact_including_ties_and_saturation(ext, data):
    if data is None:  # ties: (a*ma + b*mb) exactly k + 1/2 after the shift, and saturation both ways
        a = torch.tensor([[[1, -1, 127, -127, 3]]], dtype=torch.int8)
        b = torch.tensor([[[0, 0, 127, -127, -3]]], dtype=torch.int8)
        ma, mb, s, lo, hi = torch.tensor(1 << 29), torch.tensor(1 << 30), torch.tensor(30), -127, 127
    else:
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
        shape = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 9)), data.draw(st.integers(1, 30)))
        a = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
        b = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
        ma, mb = (torch.tensor(data.draw(st.integers(1, 2**31 - 1))) for _ in range(2))
        s = torch.tensor(data.draw(st.integers(0, 40)))
        lo, hi = data.draw(st.sampled_from([(-127, 127), (0, 127)]))
        if data.draw(st.booleans()):
            a, b = (v.transpose(1, 2).contiguous().transpose(1, 2) for v in (a, b))
    want = torch.ops.qpipe.add_requant(a, b, ma, mb, s, lo, hi, 8)
    k = cpu.AddRequant(ext, dict(ma=ma, mb=mb, s=s, lo=lo, hi=hi, bits=8))
    assert torch.equal(k(a, b), want)


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
    assert any(k.startswith(("onednn-qlinear", "int_mm")) for k in kinds), kinds  # the pointwise convs are GEMMs
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
    assert torch.equal(program_from_graph(result.gm, device="cuda")(x).cpu(), want)


@SETTINGS
@given(layer=conv1d_layers())
def test_cuda_kernels_integer_logic_on_cpu_tensors(layer):
    """The CUDA path's im2col/_int_mm/unfold logic, run on CPU tensors (Triton kernels need a GPU or TRITON_INTERPRET=1)."""
    if triton_available() and not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("Triton kernels cannot run on CPU tensors without TRITON_INTERPRET=1")
    x, a = layer
    k = CudaConv1d(torch.device("cpu"), a, 8)
    assert torch.equal(k(x), _reference(torch.ops.qpipe.conv1d_rq, x, a)), k.kind


def test_cuda_linear_and_requant_logic_on_cpu_tensors():
    if triton_available() and not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("Triton kernels cannot run on CPU tensors without TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-128, 128, (2, 5, 13), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (7, 13), generator=g, dtype=torch.int8)
    bias = torch.randint(-999, 999, (7,), generator=g, dtype=torch.int32)
    m, s = torch.randint(1, 2**31 - 1, (7,), generator=g), torch.randint(0, 40, (7,), generator=g)
    want = torch.ops.qpipe.linear_rq(x, w, bias, m, s, -127, 127, 8)
    assert torch.equal(CudaLinear(torch.device("cpu"), dict(w=w, bias=bias, m=m, s=s, lo=-127, hi=127, bits=8), 8)(x), want)
    assert isinstance(CudaRequant(torch.device("cpu"), 7, None, m, s, 0, 127, 8), CudaRequant)


@pytest.mark.slow
@pytest.mark.nemo
@pytest.mark.parametrize("model", ["demo", "quartznet_15x5"])
def test_quartznets_are_bit_exact_through_the_folder(model, tmp_path):
    from qpipe.api import load_model, quantize
    from qpipe.backends import open_folder

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if model == "demo":
        src = os.path.join(root, "models", "demo_quartznet.nemo")
    else:
        from qpipe.frontends.nemo_configs import build_random_nemo

        src = build_random_nemo(model, str(tmp_path / "m.nemo"))
    fm = load_model(src)
    out = str(tmp_path / "ti8")
    result = quantize(fm, FAST_PIPELINE, output=out, target="torch-int8", progress=False)
    qm = open_folder(out)
    g = torch.Generator().manual_seed(0)
    for b, t in ((1, 1601), (2, 803)):
        x = torch.randn(b, 64, t, generator=g)
        mult = int(qm.meta["input"]["time_multiple"] or 1)
        xt = x[:, :, : (t // mult) * mult].contiguous()
        with torch.no_grad():
            want = result.gm(xt)
        assert torch.equal(qm.logits_int(x), want), (model, b, t)


@pytest.mark.parametrize("ext", EXTS)
@SETTINGS
@given(data=st.data())
@example(data=None)
def test_input_quantizer_is_bit_exact_including_exact_halves(ext, data):
    if data is None:  # quotients exactly on a half (the reference's tie-break), saturation, -0.0
        scale = 0.25
        x = torch.tensor([[[0.125, -0.125, 0.375, -0.375, 1e9, -1e9, -0.0]]], dtype=torch.float32)
    else:
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
        scale = data.draw(st.floats(1e-3, 0.5))
        shape = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 9)), data.draw(st.integers(1, 40)))
        x = torch.randn(shape, generator=g) * data.draw(st.floats(0.1, 5.0))
    want = torch.ops.qpipe.quantize(x, scale, 8)
    k = cpu.Quantize(ext, dict(scale=scale, bits=8))
    got = k(x)
    assert got.dtype == want.dtype and torch.equal(got, want)
    if k.can_emit_f32:
        k.emit_f32 = True
        assert torch.equal(k(x), want.to(torch.float32))
