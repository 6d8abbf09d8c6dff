"""onnx-qdq lowerings of the Conformer / Citrinet ops (qpipe/backends/onnx/islands.py and its family modules).

Each op alone, on random codes (extremes included), through the builder into a one-op
ONNX model run by ONNX Runtime: the integer-exact ones bit for bit against their
reference kernels, the float islands within a bound measured here. Then the toy
Conformer block of tests/passes/test_conformer_lowering.py end to end, and (nemo,
slow) NeMo's conformer_tiny and citrinet_tiny through ``--target onnx-qdq``.
"""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import FAST_PIPELINE, ROOT  # noqa: E402
from qpipe.backends.onnx.codes import Plain  # noqa: E402
from qpipe.backends.onnx.constants import lifted  # noqa: E402
from qpipe.backends.onnx.values import QCodes  # noqa: E402
from qpipe.backends.onnx.ort_exact import exact_session  # noqa: E402
from qpipe.backends.onnx_qdq import LAYOUTS, OnnxQdqRunner, _Builder, export_onnx  # noqa: E402
from qpipe.ir.ops.layernorm import layer_norm_scale  # noqa: E402
from qpipe.ir.ops.softmax import unit_scale  # noqa: E402
from qpipe.ir.opspec import spec_of  # noqa: E402
from qpipe.ir.qtype import QType  # noqa: E402

qp = torch.ops.qpipe


class _In:
    """A graph input of the one-op model: integer codes at a qtype, or a bool / int64 tensor."""

    def __init__(self, value: torch.Tensor, qtype: QType | None = None):
        self.value, self.qtype = value, qtype


def run_one_op(op, args: dict, out_qtype: QType, layout: str = "ort", threads: int = 1):
    """``op(**args)`` through the onnx-qdq builder and ONNX Runtime; returns (reference, onnx, builder).

    ``args``: the op's arguments by schema name; an :class:`_In` is a graph input, a tensor a
    constant (``get_attr``), anything else a literal. Both results are int64 qpipe units."""
    schema = op._schema.arguments
    root = torch.nn.Module()
    graph = torch.fx.Graph()
    call, feeds, placeholders, values = [], {}, [], []
    for arg in schema:
        v = args.get(arg.name, arg.default_value if arg.has_default_value() else None)
        values.append(v.value if isinstance(v, _In) else v)
        if isinstance(v, _In):
            p = graph.placeholder(arg.name)
            p.meta = {"val": v.value}
            if v.qtype is not None:
                p.meta["qtype"] = v.qtype
            placeholders.append((p, v))
            call.append(p)
        elif isinstance(v, torch.Tensor):
            root.register_buffer(arg.name, v)
            a = graph.get_attr(arg.name)
            a.meta = {"val": v}
            call.append(a)
        else:
            call.append(v)
    ref = op(*values)
    node = graph.call_function(op, tuple(call))
    node.meta = {"val": ref, "qtype": out_qtype}
    graph.output(node)
    gm = torch.fx.GraphModule(root, graph)
    b = _Builder(gm, LAYOUTS[layout])
    from onnx import helper

    for p, v in placeholders:
        if v.qtype is None:
            elem = {torch.bool: b.TP.BOOL, torch.int64: b.TP.INT64}[v.value.dtype]
            b.inputs.append(helper.make_tensor_value_info(p.name, elem, list(v.value.shape)))
            b.env[p] = Plain(p.name, elem)
            feeds[p.name] = v.value.numpy()
            continue
        elem, zp, npdtype = b.act_type(v.qtype.bits)
        b.inputs.append(helper.make_tensor_value_info(p.name, elem, list(v.value.shape)))
        b._names.add(p.name)
        b.env[p] = QCodes(p.name, float(v.qtype.scale), zp, elem, v.qtype.bits)
        feeds[p.name] = (v.value.to(torch.int64) + zp).numpy().astype(npdtype)
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            b.env[n] = ("attr", n)
    out = b.lower(node)
    b.outputs.append(helper.make_tensor_value_info(out.name, out.elem, list(ref.shape)))
    model = helper.make_model(helper.make_graph(b.nodes, "one_op", b.inputs, b.outputs, initializer=b.inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = exact_session(model, opts)
    got = torch.from_numpy(sess.run(None, feeds)[0].astype(np.int64)) - out.zp
    return ref.to(torch.int64), got, b


def _codes(gen, shape, bits=8, extremes=True):
    hi = (1 << (bits - 1)) - 1
    x = torch.randint(-hi, hi + 1, shape, generator=gen)
    if extremes:
        flat = x.view(-1)
        flat[:4] = torch.tensor([-hi, hi, 0, -1])[: flat.numel()]
    return x.to(torch.int8 if bits <= 8 else torch.int16)


def _pair(gen, n=1, lo=(1 << 30), hi=(1 << 31) - 1, s=(30, 40)):
    m = torch.randint(lo, hi, (n,), generator=gen, dtype=torch.int64)
    return m, torch.randint(s[0], s[1], (n,), generator=gen, dtype=torch.int64)


# -- integer-exact ops: bit for bit ---------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["ort", "tensorrt"])
def test_scale_rq_is_bit_exact_per_channel_with_bias_on_16_bit_input(layout):
    gen = torch.Generator().manual_seed(0)
    x = _codes(gen, (2, 37, 24), bits=16)  # a LayerNorm core's output, channels last
    w = torch.where(torch.rand(24, generator=gen) < 0.3, -1, 1).to(torch.int8)
    bias = torch.randint(-20000, 20000, (24,), generator=gen, dtype=torch.int64)
    m, s = _pair(gen, 24, s=(36, 40))
    ref, got, b = run_one_op(qp.scale_rq.default, dict(x=_In(x, QType.of(16, 2.0 ** -14)), w=w, bias=bias, m=m, s=s,
                                                       channel_dim=2, lo=-127, hi=127, bits=8), QType.of(8, 0.02), layout)
    assert torch.equal(ref, got) and b.islands == {"scale_rq": "integer"}
    assert int(ref.min()) == -127 and int(ref.max()) == 127  # the clamp is exercised


def test_scale_rq_by_a_scalar_constant_is_bit_exact():
    gen = torch.Generator().manual_seed(1)
    x = _codes(gen, (2, 2, 19, 19))
    m, s = _pair(gen, 1, s=(30, 32))
    ref, got, _ = run_one_op(qp.scale_rq.default, dict(x=_In(x, QType.of(8, 0.03)), w=torch.tensor([-1], dtype=torch.int8),
                                                       bias=None, m=m, s=s, channel_dim=3, lo=-127, hi=127, bits=8),
                             QType.of(8, 0.01))
    assert torch.equal(ref, got)


@pytest.mark.parametrize("bits", [8, 16])
def test_masked_fill_and_pad_are_bit_exact(bits):
    gen = torch.Generator().manual_seed(2)
    x = _codes(gen, (2, 3, 11, 11), bits=bits)
    mask = torch.rand(2, 1, 11, 11, generator=gen) < 0.3
    lo = -((1 << (bits - 1)) - 1)
    for value in (lo, 0):
        ref, got, b = run_one_op(qp.masked_fill_int.default, dict(x=_In(x, QType.of(bits, 0.05)), mask=_In(mask), value=value),
                                 QType.of(bits, 0.05))
        assert torch.equal(ref, got) and b.islands == {"masked_fill_int": "integer"}
    const_mask = torch.rand(1, 1, 11, 11, generator=gen) < 0.5  # a graph constant
    ref, got, _ = run_one_op(qp.masked_fill_int.default, dict(x=_In(x, QType.of(bits, 0.05)), mask=const_mask, value=0),
                             QType.of(bits, 0.05))
    assert torch.equal(ref, got)
    for pad, value in (([1, 0], 0), ([2, 2], lo), ([0, 0, 3, 1], 5)):
        ref, got, b = run_one_op(qp.pad_int.default, dict(x=_In(x, QType.of(bits, 0.05)), pad=pad, value=value),
                                 QType.of(bits, 0.05))
        assert got.shape == ref.shape and torch.equal(ref, got), pad
        assert b.islands == {"pad_int": "integer"}


@pytest.mark.parametrize("bits_a", [8, 16])
def test_matmul_rq_is_bit_exact(bits_a):
    gen = torch.Generator().manual_seed(3)
    a = _codes(gen, (2, 4, 13, 16), bits=bits_a)  # a 16-bit a: a keep16 softmax times V (the int64 MatMul path)
    bm = _codes(gen, (2, 4, 16, 13))
    m, s = _pair(gen, 1, s=(36, 40) if bits_a == 8 else (44, 48))
    ref, got, b = run_one_op(qp.matmul_rq.default, dict(a=_In(a, QType.of(bits_a, 0.01)), b=_In(bm, QType.of(8, 0.02)),
                                                        m=m, s=s, lo=-127, hi=127, bits=8), QType.of(8, 0.03))
    assert torch.equal(ref, got) and b.islands == {"matmul_rq": "integer"}
    ops = {n.op_type for n in b.nodes}
    assert ("MatMulInteger" in ops) == (bits_a == 8) and "DequantizeLinear" not in ops


def test_matmul_acc_accumulates_exactly():
    gen = torch.Generator().manual_seed(4)
    a, bm = _codes(gen, (1, 2, 9, 8)), _codes(gen, (1, 2, 8, 9))
    ref, _, b = run_one_op(qp.matmul_rq.default, dict(a=_In(a, QType.of(8, 0.5)), b=_In(bm, QType.of(8, 0.25)),
                                                      m=torch.tensor([1 << 30]), s=torch.tensor([30]), lo=-(1 << 15) + 1,
                                                      hi=(1 << 15) - 1, bits=16), QType.of(16, 0.125))
    # m * 2**-s = 1: the requant is the identity, so the output is the exact accumulator itself
    assert torch.equal(ref, (a.to(torch.int64) @ bm.to(torch.int64)).clamp(-32767, 32767))


def test_mul_requant_is_bit_exact_with_broadcast():
    gen = torch.Generator().manual_seed(5)
    a = _codes(gen, (2, 16, 29))
    gate = _codes(gen, (2, 16, 1), bits=16)  # a squeeze-excite gate
    m, s = _pair(gen, 1, s=(44, 48))
    ref, got, b = run_one_op(qp.mul_requant.default, dict(a=_In(a, QType.of(8, 0.02)), b=_In(gate, QType.of(16, 1 / 32767)),
                                                          m=m, s=s, lo=-127, hi=127, bits=8), QType.of(8, 0.01))
    assert torch.equal(ref, got) and b.islands == {"mul_requant": "integer"}


def test_mean_int_is_bit_exact_with_and_without_a_count():
    gen = torch.Generator().manual_seed(6)
    x = _codes(gen, (3, 16, 41))
    m, s = _pair(gen, 1, s=(30, 34))
    count = torch.tensor([41, 17, 1], dtype=torch.int64).reshape(3, 1, 1)  # NeMo's masked squeeze-excite
    for c in (None, _In(count)):
        ref, got, b = run_one_op(qp.mean_int.default, dict(x=_In(x, QType.of(8, 0.02)), count=c, dim=[-1], keepdim=True,
                                                           m=m, s=s, lo=-127, hi=127, bits=8), QType.of(8, 0.001))
        assert got.shape == ref.shape and torch.equal(ref, got)
        assert b.islands == {"mean_int": "integer"}
    ref, got, _ = run_one_op(qp.mean_int.default, dict(x=_In(x, QType.of(8, 0.02)), count=None, dim=[1, 2], keepdim=False,
                                                       m=m, s=s, lo=-127, hi=127, bits=8), QType.of(8, 0.001))
    assert torch.equal(ref, got)


# -- the nonlinear ops on 8-bit inputs: exact (a table of the kernel, or its own int64 steps) -----------


def _exp_pair(sx, bits=8):
    from qpipe.ir.dyadic import dyadic
    from qpipe.ir.ops.iexp import exp_input_ratio, exp_m_bits

    m, s = dyadic(exp_input_ratio(sx), exp_m_bits(bits))
    return int(m), int(s)


def _rq_pair(ratio):
    from qpipe.ir.dyadic import dyadic

    m, s = dyadic(ratio, 31)
    return dict(m=torch.tensor([int(m)]), s=torch.tensor([int(s)]), lo=-127, hi=127, bits=8)


def _steps(ref, got):
    d = (ref - got).abs()
    return int(d.max()), float((d == 0).double().mean())


@pytest.mark.parametrize("bits", [8, 16])
def test_softmax_on_8_bit_scores_is_bit_exact(bits):
    gen = torch.Generator().manual_seed(7)
    x = _codes(gen, (2, 4, 33, 33))
    x[0, 0, 0] = -127  # a fully masked row
    for sx in (0.01, 0.0153186, 0.05):
        m, s = _exp_pair(sx)
        ref, got, b = run_one_op(qp.softmax_int.default, dict(x=_In(x, QType.of(8, sx)), dim=-1, m=m, s=s, bits=bits),
                                 QType.of(bits, unit_scale(bits)))
        assert torch.equal(ref, got), (sx, _steps(ref, got))
        assert b.islands == {"softmax_int": "integer"}
        assert "Softmax" not in {n.op_type for n in b.nodes}


@pytest.mark.parametrize("bits_in", [8, 16])
def test_masked_softmax(bits_in):
    """8-bit scores: bit-exact (masked entries 0, an all-masked row uniform); 16-bit: a float island within a step."""
    gen = torch.Generator().manual_seed(12)
    x = _codes(gen, (2, 4, 21, 21), bits=bits_in)
    lengths = torch.tensor([21, 9])
    keys = torch.arange(21)[None, :] >= lengths[:, None]  # padded keys, NeMo's pad mask
    mask = (keys[:, None, None, :] | keys[:, None, :, None])  # [2, 1, 21, 21]; padded query rows: all masked
    sx = 0.0153 if bits_in == 8 else 4e-4
    m, s = _exp_pair(sx, bits_in)
    for bits in (8, 16):
        ref, got, b = run_one_op(qp.masked_softmax_int.default, dict(x=_In(x, QType.of(bits_in, sx)), mask=_In(mask), dim=-1,
                                                                     m=m, s=s, bits=bits), QType.of(bits, unit_scale(bits)))
        if bits_in == 8:
            assert torch.equal(ref, got) and b.islands == {"masked_softmax_int": "integer"}
        else:
            worst, same = _steps(ref, got)
            assert worst <= 1 and same > 0.995 and b.islands == {"masked_softmax_int": "float island"}, (worst, same)
        assert int(got[1, :, 0, 9:].abs().max()) == 0  # padded keys get exactly 0


@pytest.mark.parametrize("d,sqrt_shift", [(64, 15), (176, 12)])
def test_layer_norm_core_is_bit_exact(d, sqrt_shift):
    gen = torch.Generator().manual_seed(8)
    x = _codes(gen, (3, 50, d))
    x[0, 0] = 5  # a constant row: only epsilon keeps it finite
    x[0, 1] = 127  # ... at the top of the range
    x[1, 0, ::2] = -127  # the largest variance
    ref, got, b = run_one_op(qp.layer_norm_core.default, dict(x=_In(x, QType.of(8, 0.03)), eps_int=3032, frac_bits=14,
                                                              sqrt_shift=sqrt_shift, bits=16), QType.of(16, layer_norm_scale(d)))
    assert torch.equal(ref, got), _steps(ref, got)
    assert b.islands == {"layer_norm_core": "integer"}


def test_the_integer_square_root_is_exact_up_to_2_to_the_62():
    from onnx import helper

    from qpipe.backends.onnx.layernorm import isqrt
    from qpipe.ir.ops.layernorm import isqrt_newton

    gen = torch.Generator().manual_seed(11)
    k = torch.randint(1, 1 << 31, (4000,), generator=gen, dtype=torch.int64)
    n = torch.cat([k * k, k * k - 1, k * k + 1, k * (k + 1), torch.randint(0, 1 << 62, (4000,), generator=gen),
                   torch.tensor([0, 1, 2, 3, (1 << 62) - 1, 1 << 62])])
    b = _Builder(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()), LAYOUTS["ort"])
    b.inputs.append(helper.make_tensor_value_info("n", b.TP.INT64, [n.numel()]))
    out = isqrt(b, "n", "t")
    b.outputs.append(helper.make_tensor_value_info(out, b.TP.INT64, [n.numel()]))
    model = helper.make_model(helper.make_graph(b.nodes, "isqrt", b.inputs, b.outputs, initializer=b.inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"n": n.numpy()})[0]
    assert torch.equal(torch.from_numpy(got), isqrt_newton(n))


def test_sigmoid_silu_glu_gelu_on_8_bit_inputs_are_bit_exact():
    from qpipe.ir.ops.gelu import gelu_input_ratio, gelu_product_scale
    from qpipe.ir.dyadic import dyadic

    gen = torch.Generator().manual_seed(9)
    x = _codes(gen, (2, 32, 50))
    for sx in (0.02, 0.05, 0.1):
        m_e, s_e = _exp_pair(sx)
        out = sx * 0.7
        for bits in (8, 16):
            ref, got, b = run_one_op(qp.sigmoid_int.default, dict(x=_In(x, QType.of(8, sx)), m_e=m_e, s_e=s_e, bits=bits),
                                     QType.of(bits, unit_scale(bits)))
            assert torch.equal(ref, got) and b.islands == {"sigmoid_int": "integer"}
        pair = _rq_pair(sx * 2.0 ** -15 / out)
        ref, got, b = run_one_op(qp.silu_int.default, dict(x=_In(x, QType.of(8, sx)), m_e=m_e, s_e=s_e, **pair),
                                 QType.of(8, out))
        assert torch.equal(ref, got) and b.islands == {"silu_int": "integer"}
        ref, got, b = run_one_op(qp.glu_int.default, dict(x=_In(x, QType.of(8, sx)), dim=1, m_e=m_e, s_e=s_e, **pair),
                                 QType.of(8, out))
        assert got.shape == ref.shape == (2, 16, 50) and torch.equal(ref, got) and b.islands == {"glu_int": "integer"}
        m_u, s_u = dyadic(gelu_input_ratio(sx), 31)
        ref, got, b = run_one_op(qp.gelu_int.default, dict(x=_In(x, QType.of(8, sx)), m_u=int(m_u), s_u=int(s_u),
                                                           **_rq_pair(gelu_product_scale(sx) / out)), QType.of(8, out))
        assert torch.equal(ref, got) and b.islands == {"gelu_int": "integer"}


# -- wider inputs: named float islands, within one step (measured: 0.9985..1.0 of the values identical) ----


def test_16_bit_inputs_are_float_islands_within_one_step():
    from qpipe.ir.ops.gelu import gelu_input_ratio, gelu_product_scale
    from qpipe.ir.dyadic import dyadic

    gen = torch.Generator().manual_seed(5)
    x = _codes(gen, (4, 4, 64, 64), bits=16)
    sx = 4e-4
    m, s = _exp_pair(sx, 16)
    for bits in (8, 16):
        ref, got, b = run_one_op(qp.softmax_int.default, dict(x=_In(x, QType.of(16, sx)), dim=-1, m=m, s=s, bits=bits),
                                 QType.of(bits, unit_scale(bits)))
        worst, same = _steps(ref, got)
        assert worst <= 1 and same > 0.995, (bits, worst, same)  # measured 1, 0.9985 (16-bit out)
        assert b.islands == {"softmax_int": "float island"}
        assert {n.op_type for n in b.nodes} >= {"DequantizeLinear", "Softmax", "QuantizeLinear"}
    x = _codes(gen, (8, 64, 200), bits=16)
    sx, out = 3e-4, 0.06
    m_e, s_e = _exp_pair(sx, 16)
    pair = _rq_pair(sx * 2.0 ** -15 / out)
    m_u, s_u = dyadic(gelu_input_ratio(sx), 31)
    cases = {
        "sigmoid_int": (qp.sigmoid_int.default, dict(m_e=m_e, s_e=s_e, bits=8), QType.of(8, unit_scale(8))),
        "silu_int": (qp.silu_int.default, dict(m_e=m_e, s_e=s_e, **pair), QType.of(8, out)),
        "glu_int": (qp.glu_int.default, dict(dim=1, m_e=m_e, s_e=s_e, **pair), QType.of(8, out)),
        "gelu_int": (qp.gelu_int.default, dict(m_u=int(m_u), s_u=int(s_u), **_rq_pair(gelu_product_scale(sx) / out)),
                     QType.of(8, out)),
    }
    for name, (op, extra, qt) in cases.items():
        ref, got, b = run_one_op(op, dict(x=_In(x, QType.of(16, sx)), **extra), qt)
        worst, same = _steps(ref, got)
        assert worst <= 1 and same > 0.999, (name, worst, same)  # measured: 1 step on <= 6e-5 of the values
        assert b.islands == {name: "float island"}


# -- a Conformer block end to end ----------------------------------------------------------------------


def _toy_conformer_module():
    path = os.path.join(ROOT, "tests", "passes", "test_conformer_lowering.py")
    spec = importlib.util.spec_from_file_location("_toy_conformer_for_onnx", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def toy_conformer_int():
    from qpipe.ir.passes import run_pipeline

    fm = _toy_conformer_module()._model()
    return run_pipeline(fm.gm, FAST_PIPELINE, state=fm.pipeline_state(), progress=False).gm


def _compare(gm, runner, feat, shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    worst, same, within1, argmax, n, frames = 0, 0, 0, 0, 0, 0
    for batch, length in shapes:
        x = torch.randn(batch, feat, length, generator=gen)
        with torch.no_grad():
            ref = gm(x).to(torch.int64)
        got = runner(x).to(torch.int64)
        assert got.shape == ref.shape
        d = (ref - got).abs()
        worst = max(worst, int(d.max()))
        same += int((d == 0).sum())
        within1 += int((d <= 1).sum())
        n += d.numel()
        argmax += int((ref.argmax(-1) == got.argmax(-1)).sum())
        frames += ref.shape[0] * ref.shape[1]
    return dict(max_step=worst, identical=same / n, within_one=within1 / n, argmax=argmax / frames)


def test_toy_conformer_exports_checks_runs_and_matches_the_reference(toy_conformer_int, tmp_path):
    gm = toy_conformer_int
    with lifted(gm):
        info = export_onnx(gm, str(tmp_path / "model.onnx"))  # onnx.checker (full) runs inside
    assert info.output_integer
    assert set(info.islands.values()) == {"integer"}, info.islands
    assert {"layer_norm_core", "matmul_rq", "pad_int", "scale_rq", "silu_int", "glu_int"} <= set(info.islands)
    assert {"softmax_int", "masked_softmax_int"} & set(info.islands)
    assert "aten.lift_fresh_copy" not in str(gm.graph)  # the graph is given back as it was
    runner = OnnxQdqRunner(info.path, threads=1, output_scale=info.output_scale)
    stats = _compare(gm, runner, 8, [(2, 24), (1, 37), (3, 60), (2, 48)])
    # measured: every int16 logit identical (max_step 0) on these 4 batches; every op is integer-exact
    assert stats["max_step"] == 0 and stats["identical"] == 1.0, stats


# -- NeMo models through --target onnx-qdq ---------------------------------------------------------------


@pytest.mark.nemo
@pytest.mark.slow
@pytest.mark.parametrize("name,feat", [("conformer_tiny", 80), ("citrinet_tiny", 80)])
def test_nemo_tiny_models_through_the_onnx_target(name, feat, tmp_path):
    pytest.importorskip("nemo")
    from qpipe.api import quantize
    from qpipe.backends import open_folder
    from qpipe.frontends.nemo_configs import build_random_nemo

    path = build_random_nemo(name, str(tmp_path / f"{name}.nemo"), seed=1)
    out = tmp_path / "onnx"
    result = quantize(path, FAST_PIPELINE, output=str(out), target="onnx-qdq", progress=False)
    meta = json.loads((out / "qpipe.json").read_text())
    assert meta["target"] == "onnx-qdq"
    islands = meta["onnx"]["islands"]
    counts = {}
    for node in result.gm.graph.nodes:
        spec = spec_of(node)
        if spec is not None and spec.name in islands:
            counts[spec.name] = counts.get(spec.name, 0) + 1
    assert {k: v["count"] for k, v in islands.items()} == counts
    model = open_folder(str(out))
    assert set(v["written"] for v in islands.values()) == {"integer"}, islands
    stats = _compare(result.gm, model.runner, feat, [(1, 160), (2, 97), (1, 333)])
    assert stats["max_step"] == 0, stats  # measured: bit-identical int16 logits, both models
