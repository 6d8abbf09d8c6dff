"""ORT sessions exact on every CPU: the saturation probe and the uint8-weight twin (:mod:`qpipe.backends.onnx.ort_exact`)."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import FAST_PIPELINE, TinyASR  # noqa: E402
from qpipe.api import quantize  # noqa: E402
from qpipe.backends.onnx.ort_exact import WEIGHT_SLOTS, exact_session, ort_u8s8_saturates, shift_int8_weights  # noqa: E402
from qpipe.backends.onnx_qdq import export_onnx  # noqa: E402


def _pointwise_at_the_extremes(cin: int = 64, cout: int = 8, t: int = 16):
    """A QLinearConv of uint8 255s by int8 127s, with an output scale that makes the exact answer 250."""
    from onnx import TensorProto as TP, helper, numpy_helper as nh

    consts = [nh.from_array(np.array(1.0, np.float32), "sx"), nh.from_array(np.array(0, np.uint8), "zx"),
              nh.from_array(np.full((cout, cin, 1), 127, np.int8), "w"), nh.from_array(np.ones(cout, np.float32), "sw"),
              nh.from_array(np.zeros(cout, np.int8), "zw"),
              nh.from_array(np.array(255 * 127 * cin / 250, np.float32), "sy"), nh.from_array(np.array(0, np.uint8), "zy")]
    node = helper.make_node("QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy"], ["y"])
    g = helper.make_graph([node], "pw", [helper.make_tensor_value_info("x", TP.UINT8, [1, cin, t])],
                          [helper.make_tensor_value_info("y", TP.UINT8, [1, cout, t])], initializer=consts)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m, {"x": np.full((1, cin, t), 255, np.uint8)}


def _opts():
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return opts


def test_the_probe_says_what_ort_computes_and_the_session_is_exact_either_way():
    model, feed = _pointwise_at_the_extremes()
    plain = ort.InferenceSession(model.SerializeToString(), _opts(), providers=["CPUExecutionProvider"])
    wrong = bool((plain.run(None, feed)[0] != 250).any())  # 126 where each pair saturates at 32,767
    assert ort_u8s8_saturates() == wrong
    for force in (False, True):
        got = exact_session(model, _opts(), force=force).run(None, feed)[0]
        assert (got == 250).all(), (force, np.unique(got))


@pytest.fixture(scope="module")
def tiny():
    from qpipe.frontends.torch import from_module

    torch.manual_seed(0)
    fm = from_module(TinyASR().eval(), (torch.randn(2, 8, 32),))
    return quantize(fm, FAST_PIPELINE, progress=False).gm


def _optimized_ops(model_bytes, tmp_path, name):
    opts = _opts()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / name)
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    return sess, collections.Counter(n.op_type for n in onnx.load(str(tmp_path / name)).graph.node)


def test_the_uint8_weight_twin_fuses_alike_and_computes_the_same_integers(tiny, tmp_path):
    gm = tiny
    info = export_onnx(gm, str(tmp_path / "model.onnx"))
    model = onnx.load(info.path)
    twin = onnx.load(info.path)
    assert shift_int8_weights(twin) == 5  # 4 conv weights' DequantizeLinears and the head's MatMulInteger
    onnx.checker.check_model(twin, full_check=True)
    inits = {t.name: t for t in twin.graph.initializer}
    for n in twin.graph.node:  # no int8 weight is left where MLAS would multiply it by uint8
        slot = WEIGHT_SLOTS.get(n.op_type)
        if slot and n.input[slot[0]] in inits:
            assert inits[n.input[slot[0]]].data_type != onnx.TensorProto.INT8, n.name
    sess_a, ops_a = _optimized_ops(model.SerializeToString(), tmp_path, "a.onnx")
    sess_b, ops_b = _optimized_ops(twin.SerializeToString(), tmp_path, "b.onnx")
    assert ops_b == ops_a and ops_b["QLinearConv"] == 4 and ops_b["DequantizeLinear"] == 0, (ops_a, ops_b)
    gen = torch.Generator().manual_seed(3)
    for batch, length in [(1, 37), (3, 64)]:
        x = torch.randn(batch, 8, length, generator=gen)
        with torch.no_grad():
            ref = gm(x).to(torch.int64).numpy()
        feed = {sess_b.get_inputs()[0].name: x.numpy()}
        got = sess_b.run(None, feed)[0].astype(np.int64)
        assert np.abs(got - ref).max() <= 1  # the onnx-qdq bar (measured 0: bit-identical)
        if not ort_u8s8_saturates():  # here the int8 original is exact too: the twin is it, bit for bit
            assert np.array_equal(got, sess_a.run(None, feed)[0].astype(np.int64))


def test_a_model_with_int8_activations_is_left_as_it_is(tmp_path):
    """The tensorrt layout: ORT runs int8 x int8 on exact kernels, and a uint8 weight there would not fuse."""
    from qpipe.frontends.torch import from_module

    torch.manual_seed(0)
    fm = from_module(TinyASR().eval(), (torch.randn(2, 8, 32),))
    passes = FAST_PIPELINE.replace("insert-observers", "insert-observers{unsigned_relu=false}")
    gm = quantize(fm, passes, progress=False).gm
    info = export_onnx(gm, str(tmp_path / "model_tensorrt.onnx"), "tensorrt")
    model = onnx.load(info.path)
    before = model.SerializeToString()
    assert shift_int8_weights(model) == 0 and model.SerializeToString() == before
