"""The onnx-qdq target: an ONNX QDQ model of the integer graph that ONNX Runtime fuses into integer kernels."""
from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import FAST_PIPELINE, TinyASR  # noqa: E402
from qpipe.api import quantize  # noqa: E402
from qpipe.backends.onnx.ort_exact import exact_session  # noqa: E402
from qpipe.backends.onnx_qdq import LAYOUTS, OnnxQdqRunner, QdqLayout, export_onnx  # noqa: E402
from qpipe.ir.errors import QpipeError  # noqa: E402
from qpipe.ir.opspec import spec_of  # noqa: E402


@pytest.fixture(scope="module")
def tiny_int():
    """TinyASR (separable conv, residual add, CTC head) through the fast pipeline: (QuantizeResult, float model)."""
    from qpipe.frontends.torch import from_module

    torch.manual_seed(0)
    fm = from_module(TinyASR().eval(), (torch.randn(2, 8, 32),))
    return quantize(fm, FAST_PIPELINE, progress=False), fm


@pytest.fixture(scope="module")
def tiny_int_signed():
    """The same model with signed ReLU outputs (``unsigned_relu=false``): what an int8-only layout (TensorRT) takes."""
    from qpipe.frontends.torch import from_module

    torch.manual_seed(0)
    fm = from_module(TinyASR().eval(), (torch.randn(2, 8, 32),))
    passes = FAST_PIPELINE.replace("insert-observers", "insert-observers{unsigned_relu=false}")
    return quantize(fm, passes, progress=False), fm


def _ops(gm, name):
    return [n for n in gm.graph.nodes if (spec_of(n) is not None and spec_of(n).name == name)]


def _optimized(info, tmp_path, threads=1):
    """The runner on an export and the op counts of the graph ONNX Runtime optimized it into."""
    opt = str(tmp_path / (os.path.basename(info.path) + ".opt.onnx"))
    runner = OnnxQdqRunner(info.path, threads=threads, output_scale=info.output_scale, optimized_model_path=opt)
    return runner, collections.Counter(n.op_type for n in onnx.load(opt).graph.node)


def _agreement(gm, runner, shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    worst, same, frames = 0, 0, 0
    for batch, length in shapes:
        x = torch.randn(batch, 8, length, generator=gen)
        with torch.no_grad():
            ref = gm(x).to(torch.int64)
        got = runner(x).to(torch.int64)
        assert got.shape == ref.shape
        worst = max(worst, int((ref - got).abs().max()))
        same += int((ref.argmax(-1) == got.argmax(-1)).sum())
        frames += ref.shape[0] * ref.shape[1]
    return worst, same / frames


def test_ort_layout_passes_the_checker_fuses_every_conv_and_add_and_matches_the_reference(tiny_int, tmp_path):
    result, _ = tiny_int
    gm = result.gm
    info = export_onnx(gm, str(tmp_path / "model.onnx"))
    model = onnx.load(info.path)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 21
    # dynamic batch and time on the way in and out
    (inp,), (out,) = model.graph.input, model.graph.output
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["B", 8, "T"]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert out_dims[0] == "B" and out_dims[1] == "T" and out_dims[2] == 6
    assert out.type.tensor_type.elem_type == onnx.TensorProto.INT16 and info.output_integer

    # an int32 bias's scale S_x*S_w is a Mul of the two scales already stored, not a third float32 per channel
    inits = {t.name: t for t in model.graph.initializer}
    producers = {n.output[0]: n for n in model.graph.node}
    bias_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                and inits[n.input[0]].data_type == onnx.TensorProto.INT32]
    assert bias_dqs and all(producers[n.input[1]].op_type == "Mul" for n in bias_dqs)
    assert len({n.name for n in model.graph.node}) == len(model.graph.node)

    runner, ops = _optimized(info, tmp_path)
    convs, adds = _ops(gm, "conv1d_rq"), _ops(gm, "add_requant")
    assert len(convs) == 5 and len(adds) == 1
    assert ops["Mul"] <= 1, ops  # ORT folded the scale products (the one left is the head's requant)
    # every 8-bit conv is a QLinearConv, the 16-bit pointwise head a MatMulInteger; no float conv, add or
    # dequantize left, and no Clip of 8-bit codes (the reference's clamps are the QuantizeLinears' saturation)
    assert ops["QLinearConv"] == len(convs) - 1 and ops["MatMulInteger"] == 1 and ops["ConvInteger"] == 0, ops
    assert ops["Clip"] == 1 and ops["Floor"] == 1, ops  # the 16-bit head's float64 requant only
    assert ops["QLinearAdd"] == len(adds), ops
    for float_op in ("Conv", "FusedConv", "DequantizeLinear", "Relu"):
        assert ops[float_op] == 0, ops
    # the input quantizer is one QuantizeLinear (qpipe's quantizer is ONNX's)
    assert ops["QuantizeLinear"] == 1, ops

    # the scales were picked so that ORT's kernels round as qpipe does on (nearly) every reachable value
    assert info.rounding["adds_exact"] == info.rounding["adds"] == 1
    assert info.rounding["conv_channels_exact"] >= 0.8 * info.rounding["conv_channels"]  # measured 38 of 44
    worst, agree = _agreement(gm, runner, [(1, 37), (3, 64), (2, 200)])
    assert worst <= 1, f"{worst} steps of difference"  # measured: 0 (bit-identical)
    assert agree >= 0.99


def test_tensorrt_layout_follows_the_explicit_quantization_rules(tiny_int_signed, tmp_path):
    """int8 with zero point 0 everywhere, weights per output channel (axis 0), activations per tensor,
    Q/DQ around every Conv and Add, nothing TensorRT lacks (uint8, int16, ConvInteger)."""
    result, _ = tiny_int_signed
    gm = result.gm
    info = export_onnx(gm, str(tmp_path / "model_tensorrt.onnx"), "tensorrt")
    model = onnx.load(info.path)
    onnx.checker.check_model(model, full_check=True)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
    types = collections.Counter(n.op_type for n in model.graph.node)
    assert not {"ConvInteger", "MatMulInteger", "QLinearConv", "Cast", "Mod"} & set(types)
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scale = inits[n.input[1]]
            if len(n.input) > 2:
                zp = inits[n.input[2]]
                assert not zp.any() and zp.dtype in (np.int8, np.int32), n.name
            else:  # an omitted zero point is 0; only a constant's DequantizeLinear leaves it out
                assert n.op_type == "DequantizeLinear" and n.input[0] in inits, n.name
            if n.op_type == "QuantizeLinear":
                assert scale.shape == () and zp.dtype == np.int8
            elif n.input[0] in inits:  # a constant: weight (int8) or bias (int32), per output channel
                w = inits[n.input[0]]
                assert w.dtype in (np.int8, np.int32) and {a.name: a.i for a in n.attribute}.get("axis") == 0
                assert scale.shape == (w.shape[0],)
            else:
                assert scale.shape == ()
        if n.op_type in ("Conv", "Add"):
            assert all(producer[i].op_type == "DequantizeLinear" for i in n.input), n.name
            after = consumers[n.output[0]]
            while after and after[0].op_type in ("Relu", "Clip"):
                after = consumers[after[0].output[0]]
            # the last layer keeps a float output: TensorRT has no int16 QuantizeLinear
            is_head = any(o.op_type == "Identity" for o in after) or (after and after[0].op_type == "Transpose")
            assert is_head or [o.op_type for o in after] == ["QuantizeLinear"], n.name
    assert types["Conv"] == 5 and types["Add"] == 1 and not info.output_integer
    runner, _ = _optimized(info, tmp_path)
    # ONNX Runtime runs this layout's convolutions in float: close, not exact
    worst, agree = _agreement(gm, runner, [(2, 64)])
    assert agree >= 0.95, agree


def test_int8_activations_leave_convs_in_float_in_ort(tiny_int_signed, tmp_path):
    """Why the default layout is uint8: the same graph with int8 activations is not fused by ORT's CPU provider."""
    gm = tiny_int_signed[0].gm
    info = export_onnx(gm, str(tmp_path / "int8.onnx"), QdqLayout("int8", activations="int8"))
    _, ops = _optimized(info, tmp_path)
    assert ops["Conv"] + ops["FusedConv"] >= 1, ops


def test_runner_is_the_target_and_the_folder_round_trips(tiny_int, tmp_path):
    """``--target onnx-qdq`` through the API: OUT/model.onnx, opened back, the reference's integer logits."""
    from qpipe.backends import get_target, open_folder

    target = get_target("onnx-qdq")
    assert target.available() == (True, "") and target.files == ("model.onnx",)
    result, fm = tiny_int
    out = tmp_path / "out"
    quantize(fm, FAST_PIPELINE, output=str(out), target="onnx-qdq", progress=False)
    assert (out / "model.onnx").is_file() and not (out / "model.pt2").exists()
    qm = open_folder(str(out))
    assert qm.meta["target"] == "onnx-qdq"
    x = torch.randn(2, 8, 48, generator=torch.Generator().manual_seed(3))
    got = qm.logits_int(x)
    assert got.dtype == torch.int16
    # same pipeline and seed as the fixture: the same integer graph
    assert int((got.to(torch.int64) - result.gm(x).to(torch.int64)).abs().max()) <= 1


def test_unsupported_layouts_and_ops_fail_in_one_line(tiny_int, tmp_path):
    with pytest.raises(QpipeError, match="unknown layout 'nope'"):
        export_onnx(tiny_int[0].gm, str(tmp_path / "x.onnx"), "nope")
    with pytest.raises(QpipeError, match="activations='uint4'"):
        QdqLayout("bad", activations="uint4")
    with pytest.raises(QpipeError, match="clamp='saturate'"):
        QdqLayout("bad", clamp="saturate")
    with pytest.raises(QpipeError, match=r"unsigned codes \[0, 255\] has no int8 type .*unsigned_relu=false"):
        export_onnx(tiny_int[0].gm, str(tmp_path / "trt.onnx"), "tensorrt")  # TensorRT has no uint8
    assert not (tmp_path / "trt.onnx").exists()
    assert set(LAYOUTS) == {"ort", "tensorrt"}


def test_relu_outputs_are_uint8_at_zero_point_0_and_stay_bit_identical(tiny_int, tmp_path):
    """ReLU outputs are unsigned codes [0, 255]: uint8 with zero point 0, whose saturation is the ReLU and
    qpipe's clamp; the residual add then mixes zero points 128 and 0, and its scales must still match."""
    gm = tiny_int[0].gm
    info = export_onnx(gm, str(tmp_path / "zp.onnx"))
    zps = {int(onnx.numpy_helper.to_array(t)) for t in onnx.load(info.path).graph.initializer
           if t.name.startswith("zp") and t.data_type == onnx.TensorProto.UINT8}
    assert zps == {0, 128}
    assert info.rounding["adds_exact"] == info.rounding["adds"] == 1
    runner, ops = _optimized(info, tmp_path)
    assert ops["QLinearAdd"] == 1 and ops["Conv"] == 0, ops
    worst, agree = _agreement(gm, runner, [(1, 37), (3, 64), (2, 200)])
    assert worst <= 1 and agree >= 0.99  # measured: 0 steps


def test_a_float_head_leaves_ort_nothing_but_its_fused_kernels(tiny_int, tmp_path):
    """A float head (``QdqLayout(head="float")``, ORT's own quantizer's shape): so nothing but ORT's fused kernels; the 8-bit codes are the
    reference's, the float logits within that layer's float32 rounding of the reference's."""
    gm = tiny_int[0].gm
    info = export_onnx(gm, str(tmp_path / "fast.onnx"), QdqLayout("float-head", head="float"))
    assert not info.output_integer
    runner, ops = _optimized(info, tmp_path)
    leftovers = set(ops) - {"QLinearConv", "QLinearAdd", "QuantizeLinear", "DequantizeLinear", "Conv", "FusedConv",
                            "Transpose", "Identity"}
    assert not leftovers, ops
    assert ops["Clip"] == ops["Cast"] == ops["ConvInteger"] == 0, ops
    assert ops["QLinearConv"] == len(_ops(gm, "conv1d_rq")) - 1  # all but the float head
    worst, agree = _agreement(gm, runner, [(1, 37), (3, 64), (2, 200)])
    assert worst <= 1 and agree >= 0.99


class _LinearModel(torch.nn.Module):
    """Strided conv, transpose, linear layers, unsqueeze/flatten: Gemm and MatMulInteger paths, layout ops."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(8, 16, 3, stride=2, padding=1)
        self.bn = torch.nn.BatchNorm1d(16)
        self.l1 = torch.nn.Linear(16, 16)
        self.l2 = torch.nn.Linear(16, 6)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).transpose(1, 2)
        h = torch.relu(self.l1(h)).unsqueeze(1).flatten(1, 2)
        return torch.log_softmax(self.l2(h), -1)


def test_linear_layers_and_layout_ops_fuse_and_match(tmp_path):
    from qpipe.frontends.torch import from_module

    torch.manual_seed(0)
    fm = from_module(_LinearModel().eval(), (torch.randn(2, 8, 32),))
    gm = quantize(fm, FAST_PIPELINE, progress=False).gm
    info = export_onnx(gm, str(tmp_path / "linear.onnx"))
    runner, ops = _optimized(info, tmp_path)
    assert ops["QLinearConv"] == 1 and ops["QGemm"] == 1 and ops["MatMulInteger"] == 1, ops
    assert ops["Conv"] == ops["Gemm"] == ops["DequantizeLinear"] == 0, ops
    worst, _ = _agreement(gm, runner, [(1, 30), (3, 64)])
    assert worst <= 1


# --------------------------------------------------------------------------- ORT's kernels, emulated


def _session(nodes, inputs, outputs, inits):
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return exact_session(model, opts)


def test_the_qlinearconv_emulation_is_ort_bit_for_bit():
    """rne(fl32(fl32(acc) * fl32(fl32(sx*sw)/sy))): what match_conv_scales assumes ORT computes."""
    from onnx import TensorProto as TP, helper, numpy_helper as nh

    from qpipe.backends.onnx.ort_rounding import conv_multiplier, ort_requant

    rng = np.random.default_rng(0)
    cin, cout, t = 64, 16, 512
    w = rng.integers(-127, 128, size=(cout, cin, 1), dtype=np.int8)
    bias = rng.integers(-20000, 20000, size=cout, dtype=np.int32)
    sx, sy = np.float32(0.0123), np.float32(0.0371)
    sw = (rng.uniform(0.5, 2.0, cout) * 1e-3).astype(np.float32)
    f = lambda *a: nh.from_array(*a)  # noqa: E731
    inits = [f(w, "w"), f(sw, "sw"), f(np.zeros(cout, np.int8), "wz"), f(bias, "b"), f((sx * sw).astype(np.float32), "sb"),
             f(np.zeros(cout, np.int32), "bz"), f(np.array(sx), "sx"), f(np.array(sy), "sy"), f(np.array(128, np.uint8), "z")]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "sx", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "sw", "wz"], ["wd"], axis=0),
        helper.make_node("DequantizeLinear", ["b", "sb", "bz"], ["bd"], axis=0),
        helper.make_node("Conv", ["xd", "wd", "bd"], ["y"]),
        helper.make_node("QuantizeLinear", ["y", "sy", "z"], ["q"]),
    ]
    sess = _session(nodes, [helper.make_tensor_value_info("x", TP.UINT8, [1, cin, t])],
                    [helper.make_tensor_value_info("q", TP.UINT8, None)], inits)
    x = rng.integers(1, 256, size=(1, cin, t), dtype=np.uint8)
    got = sess.run(None, {"x": x})[0].astype(np.int64) - 128
    acc = np.einsum("oi,it->ot", w[:, :, 0].astype(np.int64), x[0].astype(np.int64) - 128) + bias[:, None]
    mult = conv_multiplier(sx, sw, sy)
    want = np.stack([ort_requant(acc[c], mult[c : c + 1])[0] for c in range(cout)]).clip(-128, 127)
    assert np.array_equal(got[0], want)


@pytest.mark.parametrize("za,zb,zc,scales", [
    (128, 128, 128, (0.0113, 0.0071, 0.0150)),
    (128, 128, 128, (0.031, 0.002, 0.0297)),
    (128, 0, 0, (0.0113, 0.0071, 0.0150)),  # a signed output plus a ReLU output (zero point 0) into a ReLU output
])
def test_the_qlinearadd_emulation_is_ort_bit_for_bit(za, zb, zc, scales):
    from onnx import TensorProto as TP, helper, numpy_helper as nh

    from qpipe.backends.onnx.ort_rounding import ort_qladd_u8

    a = np.repeat(np.arange(256, dtype=np.uint8), 256).reshape(1, 1, -1)
    b = np.tile(np.arange(256, dtype=np.uint8), 256).reshape(1, 1, -1)
    sa, sb, sc = scales
    inits = [nh.from_array(np.array(v, np.float32), n) for v, n in ((sa, "sa"), (sb, "sb"), (sc, "sc"))]
    inits += [nh.from_array(np.array(z, np.uint8), n) for z, n in ((za, "za"), (zb, "zb"), (zc, "zc"))]
    nodes = [
        helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["ad"]),
        helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bd"]),
        helper.make_node("Add", ["ad", "bd"], ["y"]),
        helper.make_node("QuantizeLinear", ["y", "sc", "zc"], ["q"]),
    ]
    vi = [helper.make_tensor_value_info(n, TP.UINT8, [1, 1, 65536]) for n in ("a", "b")]
    sess = _session(nodes, vi, [helper.make_tensor_value_info("q", TP.UINT8, None)], inits)
    got = sess.run(None, {"a": a, "b": b})[0].reshape(-1).astype(np.int64)
    r_ac, r_bc = np.float32(sa) / np.float32(sc), np.float32(sb) / np.float32(sc)
    want = ort_qladd_u8(a.reshape(-1), b.reshape(-1), r_ac, r_bc, za, zb, zc).clip(0, 255)
    assert np.array_equal(got, want)


# --------------------------------------------------------------------------- the demo QuartzNet


@pytest.mark.nemo
@pytest.mark.slow
def test_demo_quartznet_through_onnx_runtime_is_bit_identical_on_the_heldout_set(tmp_path):
    """``--target onnx-qdq`` on the demo QuartzNet: every conv and add fused, and the held-out integer
    logits equal the reference's from the same run, every one of them."""
    pytest.importorskip("nemo")
    from pathlib import Path

    from qpipe.backends import open_folder

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "demo_onnx"
    result = quantize(str(root / "models" / "demo_quartznet.nemo"), passes="default", output=str(out),
                      target="onnx-qdq", progress=False)
    info_path = str(out / "model.onnx")
    opt = str(tmp_path / "opt.onnx")
    OnnxQdqRunner(info_path, threads=1, optimized_model_path=opt)
    ops = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
    assert ops["QLinearConv"] == 42 and ops["QLinearAdd"] == 5 and ops["MatMulInteger"] == 1, ops
    assert ops["Clip"] == 1 and ops["ConvInteger"] == 0, ops  # only the 16-bit head's clamp
    assert ops["Conv"] == ops["FusedConv"] == ops["DequantizeLinear"] == 0, ops
    qm = open_folder(str(out))
    fz = qm.featurizer()
    multiple = int(qm.meta["input"]["time_multiple"] or 1)
    identical, same, frames, worst = 0, 0, 0, 0
    for audio in sorted((root / "data" / "eval" / "heldout" / "audio").iterdir()):
        x = fz.file(str(audio))
        got = qm.logits_int(x)
        with torch.no_grad():  # the reference program of the same run (calibration differs by CPU, so no fixture)
            ref = result.gm(x[:, :, : (x.shape[2] // multiple) * multiple].contiguous())
        assert got.shape == ref.shape
        identical += int(torch.equal(got, ref))
        worst = max(worst, int((got.to(torch.int64) - ref.to(torch.int64)).abs().max()))
        same += int((ref.argmax(-1) == got.argmax(-1)).sum())
        frames += got.shape[1]
    # 8-bit convs requantize by the float32 multiplier ORT computes itself (substitute-int-ops{requant=f32}),
    # the adds by scales matched exhaustively: every integer is the reference's, on any CPU
    assert identical == 130 and worst == 0, f"{identical} of 130 utterances bit-identical (worst {worst} steps)"
    assert same == frames


def test_a_target_without_uint8_quantizes_relu_outputs_signed():
    """``--target tensorrt`` (TensorRT has no uint8) sets ``insert-observers{unsigned_relu=false}`` unless the
    pipeline says otherwise; a pipeline that asks for unsigned codes keeps them (and the export says why it fails)."""
    from qpipe.api import apply_pass_defaults
    from qpipe.backends import get_target
    from qpipe.ir.passes import parse_pipeline

    def unsigned_relu(text):
        pipeline = parse_pipeline(text)
        apply_pass_defaults(pipeline, get_target("tensorrt"), text)
        return next(s.options["unsigned_relu"] for s in pipeline.steps if s.spec.name == "insert-observers")

    assert unsigned_relu(FAST_PIPELINE) is False
    assert unsigned_relu(FAST_PIPELINE.replace("insert-observers", "insert-observers{unsigned_relu=true}")) is True
    pipeline = parse_pipeline(FAST_PIPELINE)
    apply_pass_defaults(pipeline, get_target("onnx-qdq"), FAST_PIPELINE)
    assert next(s.options["unsigned_relu"] for s in pipeline.steps if s.spec.name == "insert-observers") is True
