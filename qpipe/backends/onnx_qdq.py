"""ONNX QDQ export of the integer graph, for ONNX Runtime (and TensorRT's explicit quantization).

The integer program becomes a float ONNX graph with QuantizeLinear /
DequantizeLinear (QDQ) pairs where qpipe has integer tensors, placed so that the
runtimes fuse them back into integer kernels:

* the float features are a ``QuantizeLinear`` (qpipe's input quantizer *is*
  ONNX QuantizeLinear: float32 quotient, half to even);
* a ``*_rq`` op (conv, linear) is ``DQ(x)`` and ``DQ(weight int8, per output
  channel, axis 0)`` and ``DQ(bias int32 at S_x*S_w)`` into ``Conv`` / ``Gemm``,
  then ``QuantizeLinear`` at the op's output scale (its ``qtype``);
* ``add_requant`` is ``DQ(a)``, ``DQ(b)`` -> ``Add`` -> ``QuantizeLinear``;
* ``clamp_int`` and the clamps of the ops above are exact (see below);
* layout ops are ONNX Transpose / Reshape / Unsqueeze / ... on the integer codes.

qpipe's activation codes are int8 on [-128, 127], or uint8 on [0, 255] for a
ReLU's output, and both are what an 8-bit QuantizeLinear saturates to: the
reference's clamps *are* the runtimes' saturation, so no clamp needs an op of
its own. Two layouts (:data:`LAYOUTS`; ``head="float"`` gives the ORT-quantizer shape of the last layer):

``ort`` (the default, what ``--target onnx-qdq`` writes)
    signed activations are **uint8 with zero point 128** (the same integers,
    shifted), unsigned ones uint8 with zero point 0, which ONNX Runtime's CPU
    provider fuses completely (every Conv into ``QLinearConv``, every residual
    Add into ``QLinearAdd``; with int8 activations it leaves convolutions in
    float). The int16 output layer is ``MatMulInteger`` (a 1x1 conv or a
    linear; ``ConvInteger`` otherwise) plus qpipe's own dyadic requantization
    (float64 where that is exact, int64 otherwise), so the logits are int16 in
    the reference's integer units.
``tensorrt``
    what TensorRT's explicit quantization accepts: int8 activations with zero
    point 0, weights int8 per output channel (DQ axis 0), ReLU as a float
    ``Relu`` between the op and its ``QuantizeLinear``, and the last layer
    ``DQ -> Conv`` with a float output (TensorRT has no int16 QuantizeLinear
    and no ConvInteger); the runner divides by the output scale and rounds.
    TensorRT has no uint8: a model whose ReLU outputs are unsigned
    (``insert-observers{unsigned_relu=true}``, the default) is refused with a
    one-line error; quantize it with ``unsigned_relu=false``.

ORT's fused kernels requantize with a float32 multiplier and round half to
even. An 8-bit conv / linear of the reference does exactly that
(``substitute-int-ops{requant=f32}``, the default: its ``(m, s)`` is
``fl32(fl32(S_x*S_w)/S_y)``), so the ``ort`` layout writes the qtype's float32
scales and ORT's QLinearConv / QGemm compute the reference's integers on every
input. Where a requantization is dyadic (``requant=dyadic``, and the residual
adds) the two roundings differ on values within about 2**-24 of a boundary, and
the layout picks each DequantizeLinear scale within a few float32 ulps of the
qtype's so that ORT's x86 kernels round like qpipe on every reachable boundary
value (:mod:`qpipe.backends.onnx.ort_rounding`; exhaustive for the adds).
"""
from __future__ import annotations

import operator
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch.fx import GraphModule, Node

from qpipe.backends.onnx.islands import ATEN_LOWERINGS, LOWERINGS as ISLAND_LOWERINGS
from qpipe.backends.onnx.ort_exact import exact_session
from qpipe.backends.onnx.ort_rounding import MatchStats, conv_multiplier, match_add_scales, match_conv_scales
from qpipe.backends.onnx.values import QCodes, Real
from qpipe.backends.target import SaveRecord, Target, register_target
from qpipe.ir.errors import QpipeError
from qpipe.ir.graph_utils import fetch_attr
from qpipe.ir.opspec import OpKind, spec_of
from qpipe.ir.ops.kernels import unsigned_codes
from qpipe.ir.qtype import QType, qtype_of

aten = torch.ops.aten
OPSET = 21
INPUT_NAME = "features"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class QdqLayout:
    """How the integer codes are laid out in ONNX.

    ``activations``: signed codes as ``uint8`` (zero point 128; unsigned codes take
    zero point 0) or ``int8`` (zero point 0; no unsigned codes);
    ``clamp``: where a clamp narrower than the code type goes (a ``clamp_int``, a
    ReLU6): ``codes`` (a Clip of the integer codes after the QuantizeLinear) or
    ``float`` (a Relu / Clip before it);
    ``head``: the last (16-bit) layer as ``integer`` (MatMulInteger / ConvInteger +
    dyadic requant in int64) or ``float`` (DQ -> Conv, float output);
    ``weight_scale``: ``qtype`` (the qtype's scales, rounded to float32) or
    ``matched`` (float32 scales within a few ulps of those, chosen so that ORT's
    x86 kernels round every reachable value as qpipe's dyadic requantization
    does: :mod:`qpipe.backends.onnx.ort_rounding`; uint8 activations only);
    ``bias_scale``: the int32 bias's DequantizeLinear scale ``S_x*S_w`` as an initializer of its
    own (``stored``) or as ``Mul(S_x, S_w)`` of the two scales already in the file (``product``:
    ORT folds the constant Mul before it fuses the QLinearConv; one float32 per channel less on
    disk, 2 % of the demo's file; TensorRT wants the scale an initializer).
    """

    name: str
    activations: str = "uint8"
    clamp: str = "codes"
    head: str = "integer"
    weight_scale: str = "matched"
    bias_scale: str = "product"

    def __post_init__(self) -> None:
        checks = {
            "activations": ("uint8", "int8"),
            "clamp": ("codes", "float"),
            "head": ("integer", "float"),
            "weight_scale": ("qtype", "matched"),
            "bias_scale": ("stored", "product"),
        }
        for key, allowed in checks.items():
            if getattr(self, key) not in allowed:
                raise QpipeError(f"onnx-qdq layout {key}={getattr(self, key)!r}: choose one of {', '.join(allowed)}")

    @property
    def zero_point(self) -> int:
        return 128 if self.activations == "uint8" else 0


LAYOUTS = {
    "ort": QdqLayout("ort"),
    "tensorrt": QdqLayout("tensorrt", activations="int8", clamp="float", head="float", weight_scale="qtype",
                          bias_scale="stored"),
}


@dataclass
class ExportInfo:
    """What :func:`export_onnx` wrote: the file, the layout and how the output maps to integers."""

    path: str
    layout: str
    output_integer: bool  # the ONNX output already holds the reference's integer logits
    output_scale: float
    output_bits: int
    op_counts: dict[str, int] = field(default_factory=dict)
    rounding: dict[str, int] = field(default_factory=dict)  # MatchStats of the matched scales
    islands: dict[str, str] = field(default_factory=dict)  # op -> "integer" / "float island" (islands.py)


# ---------------------------------------------------------------------------------------------
# values


_Q = QCodes  # the builder's short names
_R = Real


def _require_onnx():
    try:
        import onnx  # noqa: F401
        from onnx import TensorProto, helper, numpy_helper  # noqa: F401
    except ImportError as e:  # pragma: no cover - onnx is a dependency
        raise QpipeError("the onnx-qdq target needs the onnx package (pip install onnx)") from e
    return onnx


def _f32(x: float) -> float:
    return float(np.float32(x))


class _Builder:
    def __init__(self, gm: GraphModule, layout: QdqLayout):
        _require_onnx()
        from onnx import TensorProto

        self.TP = TensorProto
        self.gm = gm
        self.layout = layout
        self.nodes: list = []
        self.inits: list = []
        self.inputs: list = []
        self.outputs: list = []
        self.env: dict[Node, Union[_Q, _R, Any]] = {}
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self.output_integer = True
        self.match = layout.weight_scale == "matched" and layout.activations == "uint8"
        self.stats = MatchStats()
        self.islands: dict[str, str] = {}  # qpipe op name -> "integer" or "float island" (islands.py)

    # -- naming and constants ------------------------------------------------------------
    def fresh(self, base: str) -> str:
        base = base.replace(".", "_")
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def const(self, hint: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        value = np.asarray(value)
        key = (value.dtype.str, value.shape, value.tobytes())
        if key in self._consts:
            return self._consts[key]
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(value, name))
        self._consts[key] = name
        return name

    def node(self, op: str, inputs: Sequence[str], hint: str, domain: str = "", **attrs) -> str:
        from onnx import helper

        out = self.fresh(hint)  # the node is named as its output (unique; Netron and ORT's profiles show it)
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, domain=domain, **attrs))
        return out

    # -- quantized values ----------------------------------------------------------------
    def act_type(self, bits: int) -> tuple[int, int, Any]:
        """(onnx elem type, zero point, numpy dtype) of an activation of ``bits`` bits."""
        if bits <= 8:
            if self.layout.activations == "uint8":
                return self.TP.UINT8, 128, np.uint8
            return self.TP.INT8, 0, np.int8
        if bits <= 16:
            return self.TP.INT16, 0, np.int16
        raise QpipeError(f"onnx-qdq: no ONNX activation type for {bits} bits")

    def code_type(self, lo: int, hi: int, bits: int) -> tuple[int, int, Any, int, int]:
        """(onnx elem type, zero point, numpy dtype, lowest code, highest code) of an output clamped to
        ``[lo, hi]``; the code range is what a QuantizeLinear saturates to, in qpipe units. Unsigned codes
        (``[0, 255]``, a ReLU's output) are uint8 with zero point 0: the saturation is the clamp."""
        elem, zp, npdtype = self.act_type(bits)
        if unsigned_codes(bits, lo, hi):
            if self.layout.activations != "uint8":
                raise QpipeError(f"onnx-qdq layout {self.layout.name!r}: a ReLU output on the unsigned codes [0, {hi}] "
                                 "has no int8 type (TensorRT has no uint8): quantize with insert-observers{unsigned_relu=false}")
            zp = 0
        info = np.iinfo(npdtype)
        return elem, zp, npdtype, int(info.min) - zp, int(info.max) - zp

    def zp_const(self, zp: int, npdtype) -> str:
        return self.const("zp", np.array(zp, dtype=npdtype))

    def dq(self, v: Union[_Q, _R], hint: str, scale: Optional[float] = None) -> str:
        """A DequantizeLinear of ``v`` for one consumer (ORT fuses a DQ with one consumer);
        ``scale``: this consumer's own float32 scale (see :mod:`qpipe.backends.onnx.ort_rounding`)."""
        if isinstance(v, _R):
            return v.name
        npdtype = {self.TP.UINT8: np.uint8, self.TP.INT8: np.int8, self.TP.INT16: np.int16}[v.elem]
        scale = self.const("scale", np.array(v.scale if scale is None else scale, dtype=np.float32))
        return self.node("DequantizeLinear", [v.name, scale, self.zp_const(v.zp, npdtype)], f"{hint}_dq")

    def quantize(self, real: str, qt: QType, hint: str, lo: int, hi: int) -> _Q:
        """QuantizeLinear to ``qt``'s scale with qpipe's integer clamp [lo, hi] (its saturation, and where
        the clamp is narrower than the code type, a Clip placed as the layout says)."""
        if qt.per_channel:
            raise QpipeError(f"onnx-qdq: {hint}: a per-channel activation scale cannot be a per-tensor QuantizeLinear")
        elem, zp, npdtype, code_lo, code_hi = self.code_type(lo, hi, qt.bits)
        scale = float(qt.scale)
        need_lo, need_hi = lo > code_lo, hi < code_hi
        if (need_lo or need_hi) and self.layout.clamp == "float":  # a Relu / Clip before the Q
            if lo == 0 and not need_hi:
                real = self.node("Relu", [real], f"{hint}_relu")
            else:
                flo = self.const("flo", np.array(_f32(lo * scale) if need_lo else -np.inf, np.float32))
                fhi = self.const("fhi", np.array(_f32(hi * scale) if need_hi else np.inf, np.float32))
                real = self.node("Clip", [real, flo, fhi], f"{hint}_clip")
            need_lo = need_hi = False
        name = self.node(
            "QuantizeLinear",
            [real, self.const("scale", np.array(scale, dtype=np.float32)), self.zp_const(zp, npdtype)],
            f"{hint}_q",
        )
        if need_lo or need_hi:  # a Clip of the integer codes after the Q: exact, and the Conv -> Q group still fuses
            clip_lo = self.const("clip_lo", np.array(max(lo, code_lo) + zp, dtype=npdtype))
            clip_hi = self.const("clip_hi", np.array(min(hi, code_hi) + zp, dtype=npdtype))
            name = self.node("Clip", [name, clip_lo, clip_hi], f"{hint}_clip")
        return _Q(name, scale, zp, elem, qt.bits, max(lo, code_lo), min(hi, code_hi))

    # -- graph ---------------------------------------------------------------------------
    def value(self, arg: Any) -> Any:
        if isinstance(arg, Node):
            if arg not in self.env:
                raise QpipeError(f"onnx-qdq: %{arg.name} used before it is defined")
            return self.env[arg]
        return arg

    def build(self, opset: int = OPSET):
        from onnx import helper

        outputs_meta = self.gm.meta.get("qpipe_outputs") or []
        dim_names = {str(k): v for k, v in (self.gm.meta.get("qpipe_dim_names") or {}).items()}
        self.dim_names = dim_names
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                val = node.meta.get("val")
                shape = self.shape_of(val)
                name = INPUT_NAME if not self.inputs else self.fresh(node.name)
                self._names.add(name)
                self.inputs.append(helper.make_tensor_value_info(name, self.TP.FLOAT, shape))
                self.env[node] = _R(name)
            elif node.op == "get_attr":
                self.env[node] = ("attr", node)
            elif node.op == "call_function":
                self.env[node] = self.lower(node)
            elif node.op == "output":
                outs = node.args[0]
                outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
                for i, out in enumerate(outs):
                    meta = outputs_meta[i] if i < len(outputs_meta) else {}
                    self.emit_output(out, i, len(outs), meta)
            else:
                raise QpipeError(f"onnx-qdq: cannot export a {node.op} node (%{node.name})")
        graph = helper.make_graph(self.nodes, "qpipe_integer", self.inputs, self.outputs, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qpipe")
        model.ir_version = min(model.ir_version, 10)
        return model

    def shape_of(self, val: Any, out_name: Optional[str] = None) -> list:
        if not isinstance(val, torch.Tensor):
            return None
        dims = []
        for i, d in enumerate(val.shape):
            if isinstance(d, int):
                dims.append(int(d))
            else:
                expr = str(d)
                dims.append(self.dim_names.get(expr, expr if expr.isidentifier() else f"{out_name or 'dim'}_{i}"))
        return dims

    def emit_output(self, out: Node, i: int, n: int, meta: dict) -> None:
        from onnx import helper

        v = self.value(out)
        name = OUTPUT_NAME if n == 1 else f"{OUTPUT_NAME}_{i}"
        shape = self.shape_of(out.meta.get("val"), name)
        if isinstance(v, _Q):
            elem = v.elem
            if v.zp:
                raise QpipeError(f"onnx-qdq: output %{out.name} has zero point {v.zp}; expected a 16-bit output")
        else:
            elem = self.TP.FLOAT
            self.output_integer = False
        self.nodes.append(helper.make_node("Identity", [v.name], [name], name=self.fresh("output")))
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    # -- lowering ------------------------------------------------------------------------
    def lower(self, node: Node):
        spec = spec_of(node)
        if spec is not None:
            name = spec.name
            if name == "quantize":
                return self.lower_quantize(node, spec)
            if name in ("conv1d_rq", "conv2d_rq", "conv1d_acc", "conv2d_acc"):
                return self.lower_conv(node, spec)
            if name in ("linear_rq", "linear_acc"):
                return self.lower_linear(node, spec)
            if name == "requant":
                return self.lower_requant(node, spec)
            if name == "add_requant":
                return self.lower_add(node, spec)
            if name == "clamp_int":
                return self.lower_clamp(node, spec)
            if name in ISLAND_LOWERINGS:
                return ISLAND_LOWERINGS[name](self, node, spec)
            raise QpipeError(f"onnx-qdq: no ONNX lowering for qpipe.{name} (%{node.name})")
        return self.lower_aten(node)

    def qtype(self, node: Node) -> QType:
        qt = qtype_of(node)
        if qt is None:
            raise QpipeError(f"onnx-qdq: %{node.name} has no qtype")
        return qt

    def tensor(self, arg: Any) -> Optional[torch.Tensor]:
        if arg is None:
            return None
        if isinstance(arg, Node) and arg.op == "get_attr":
            return fetch_attr(self.gm, str(arg.target)).detach().cpu()
        raise QpipeError(f"onnx-qdq: expected a constant, got {arg!r}")

    def lower_quantize(self, node: Node, spec) -> _Q:
        """qpipe's input quantizer is ONNX QuantizeLinear (float32 quotient, half to even, full signed range)."""
        b = spec.bind(node)
        x = self.value(b["x"])
        bits = int(b["bits"])
        return self.quantize(x.name, self.qtype(node), node.name, -(1 << (bits - 1)), (1 << (bits - 1)) - 1)

    def _weight_dq(self, node: Node, w: torch.Tensor, sw: np.ndarray, zero_point: bool = False) -> str:
        """DequantizeLinear of an int8 per-output-channel weight (axis 0); ``zero_point``: write the zeros
        (ORT fuses DQ -> Gemm into QGemm only with them; DQ -> Conv into QLinearConv without)."""
        wname = self.const(f"{node.name}_w", w.numpy().astype(np.int8))
        scale = self.const(f"{node.name}_w_scale", sw.astype(np.float32))
        inputs = [wname, scale]
        if zero_point:  # else left out: it defaults to 0, and the per-channel zeros were 3 % of the demo's file
            inputs.append(self.const(f"{node.name}_w_zp", np.zeros(len(sw), dtype=np.int8)))
        return self.node("DequantizeLinear", inputs, f"{node.name}_w_dq", axis=0)

    def _bias_dq(self, node: Node, bias: Optional[torch.Tensor], x: _Q, sw: np.ndarray,
                 zero_point: bool = False) -> Optional[str]:
        """DequantizeLinear of the int32 bias at ``fl32(S_x) * S_w`` (float32, per channel): the
        product stored, or computed from the two scales the input and weight DQs already hold."""
        if bias is None:
            return None
        bname = self.const(f"{node.name}_b", bias.numpy().astype(np.int32))
        sx = np.float32(x.scale)
        if self.layout.bias_scale == "product":  # the same float32 product, as ONNX's Mul rounds it
            scale = self.node("Mul", [self.const("scale", np.array(sx)), self.const(f"{node.name}_w_scale", sw)],
                              f"{node.name}_b_scale")
        else:
            scale = self.const(f"{node.name}_b_scale", (sx * sw).astype(np.float32))
        inputs = [bname, scale]
        if zero_point:
            inputs.append(self.const(f"{node.name}_b_zp", np.zeros(len(sw), dtype=np.int32)))
        return self.node("DequantizeLinear", inputs, f"{node.name}_b_dq", axis=0)

    def _scales(self, node: Node, b: dict, x: _Q, out_qt: Optional[QType]) -> np.ndarray:
        """The weight scales of a weighted op as a float32 array (per output channel)."""
        w_node = b["w"]
        w = self.tensor(w_node)
        wq = self.qtype(w_node)
        cout = int(w.shape[0])
        sw = np.array(wq.scales if wq.per_channel else wq.scales * cout, dtype=np.float64)
        sw32 = sw.astype(np.float32)
        if b.get("f32") and out_qt is not None and self.layout.activations == "uint8":
            # the reference's multiplier is fl32(fl32(S_x*S_w)/S_y) of these very float32 scales:
            # ORT's QLinearConv / QGemm compute the same one and round as the reference does
            m = np.broadcast_to(self.tensor(b["m"]).numpy().astype(np.int64).reshape(-1), (cout,))
            s = np.broadcast_to(self.tensor(b["s"]).numpy().astype(np.int64).reshape(-1), (cout,))
            got = conv_multiplier(x.scale, sw32, float(out_qt.scale)).astype(np.float64)
            if not np.array_equal(got, m * np.power(2.0, -s.astype(np.float64))):
                raise QpipeError(f"onnx-qdq: %{node.name}: ORT's float32 multiplier is not the reference's "
                                 "(was the graph requantized for other scales?)")
            self.stats.conv_channels += cout
            self.stats.conv_channels_exact += cout
        elif self.match and out_qt is not None and "m" in b:
            m = np.broadcast_to(self.tensor(b["m"]).numpy().astype(np.int64).reshape(-1), (cout,))
            s = np.broadcast_to(self.tensor(b["s"]).numpy().astype(np.int64).reshape(-1), (cout,))
            sy = float(out_qt.scale)
            start = (m / np.power(2.0, s) * float(np.float32(sy)) / float(np.float32(x.scale))).astype(np.float32)
            bound = self.acc_bounds(x, w, self.tensor(b["bias"]))
            lo, hi = int(b["lo"]), int(b["hi"])
            sw32 = match_conv_scales(x.scale, sy, m, s, lo, hi, bound, start, stats=self.stats)
        return sw32

    def _is_head(self, node: Node, b: dict) -> bool:
        return "bits" in b and int(b["bits"]) > 8

    def lower_conv(self, node: Node, spec):
        b = spec.bind(node)
        x = self.value(b["x"])
        if not isinstance(x, _Q):
            raise QpipeError(f"onnx-qdq: the input of %{node.name} is not an integer tensor")
        w = self.tensor(b["w"])
        bias = self.tensor(b["bias"])
        k = w.dim() - 2
        rq = spec.kind is OpKind.REQUANTIZE
        out_qt = self.qtype(node) if rq else None
        attrs = dict(
            strides=[int(v) for v in b["stride"]] * (k if len(b["stride"]) == 1 else 1),
            pads=[int(v) for v in b["padding"]] * (k if len(b["padding"]) == 1 else 1) * 2,
            dilations=[int(v) for v in b["dilation"]] * (k if len(b["dilation"]) == 1 else 1),
            group=int(b["groups"]),
            kernel_shape=[int(v) for v in w.shape[2:]],
        )
        if rq and self._is_head(node, b) and self.layout.head == "integer":
            return self.integer_head_conv(node, b, x, w, bias, attrs)
        sw = self._scales(node, b, x, out_qt)
        inputs = [self.dq(x, node.name), self._weight_dq(node, w, sw)]
        bdq = self._bias_dq(node, bias, x, sw)
        if bdq is not None:
            inputs.append(bdq)
        y = self.node("Conv", inputs, f"{node.name}_conv", **attrs)
        if not rq:
            return _R(y)
        return self.finish_rq(node, b, y, out_qt)

    def finish_rq(self, node: Node, b: dict, real: str, out_qt: QType):
        lo, hi = int(b["lo"]), int(b["hi"])
        if self._is_head(node, b) and self.layout.head == "float":
            if lo > -(1 << (int(b["bits"]) - 1)) + 1 or hi < (1 << (int(b["bits"]) - 1)) - 1:
                raise QpipeError(f"onnx-qdq: %{node.name}: a clamped 16-bit output cannot stay float")
            return _R(real)
        return self.quantize(real, out_qt, node.name, lo, hi)

    def integer_head_conv(self, node: Node, b: dict, x: _Q, w, bias, attrs) -> _Q:
        """An integer conv + qpipe's exact dyadic requantization in int64 -> int16 codes.

        A pointwise conv1d (QuartzNet's and Citrinet's decoder) is ``MatMulInteger`` over the time-major
        codes, then transposed back: ORT's ``ConvInteger`` measured 8x slower on the demo's head."""
        zp, npdtype = x.zp, {self.TP.UINT8: np.uint8, self.TP.INT8: np.int8}[x.elem]
        pointwise = (w.dim() == 3 and attrs["kernel_shape"] == [1] and attrs["strides"] == [1]
                     and attrs["pads"] == [0, 0] and attrs["group"] == 1)
        if pointwise:
            cout = int(w.shape[0])
            xt = self.node("Transpose", [x.name], f"{node.name}_tmajor", perm=[0, 2, 1])
            wt = self.const(f"{node.name}_wt", np.ascontiguousarray(w.numpy().astype(np.int8)[:, :, 0].T))
            acc = self.node("MatMulInteger", [xt, wt, self.zp_const(zp, npdtype)], f"{node.name}_acc")
            out = self.integer_requant(node, b, acc, cout, (cout,), self.acc_bounds(x, w, bias), bias)
            return replace(out, name=self.node("Transpose", [out.name], f"{node.name}_cmajor", perm=[0, 2, 1]))
        wname = self.const(f"{node.name}_w", w.numpy().astype(np.int8))
        acc = self.node("ConvInteger", [x.name, wname, self.zp_const(zp, npdtype)], f"{node.name}_acc", **attrs)
        nd = w.dim()
        cshape = (1, int(w.shape[0])) + (1,) * (nd - 2)
        return self.integer_requant(node, b, acc, int(w.shape[0]), cshape, self.acc_bounds(x, w, bias), bias)

    @staticmethod
    def acc_bounds(x: _Q, w: torch.Tensor, bias: Optional[torch.Tensor]) -> np.ndarray:
        """Per output channel, ``max|x| * sum|w_c| + |b_c|``: no accumulator of that channel is larger."""
        reach = max(abs(x.lo), abs(x.hi))
        bound = w.to(torch.int64).abs().reshape(int(w.shape[0]), -1).sum(1).numpy() * reach
        if bias is not None:
            bound = bound + bias.to(torch.int64).abs().numpy()
        return bound

    def integer_requant(self, node: Node, b: dict, acc: str, c: int, cshape, bounds: Optional[np.ndarray] = None,
                        bias: Optional[torch.Tensor] = None) -> _Q:
        """qpipe's requantization, exactly: ``clamp(((acc + bias)*m + 2**(s-1)) >> s)`` per channel.

        Where every channel's ``bounds * m + 2**(s-1)`` is below 2**53 (the lowering keeps the
        logits' pairs so) it is float64 ``floor(acc * (m / 2**s) + 1/2)``: the product, the sum and
        the floor are all exact there, and ORT runs it 5x faster than the int64 form. Otherwise
        int64: ``acc*m + 2**(s-1)`` shifted up by a multiple ``K * 2**s`` that makes it non-negative,
        so that ``Div`` (which truncates) is the floor, then ``K`` taken off again; without ``bounds``,
        the floor is ``v - Mod(v, 2**s)`` divided. ``bounds`` (of ``acc + bias``) must cover the bias;
        the float64 form folds ``bias * m / 2**s`` into its rounding offset (exact by the same bound:
        both terms and their sum are multiples of ``2**-s`` below ``2**(53-s)``), one op fewer."""
        m = np.broadcast_to(self.tensor(b["m"]).numpy().astype(np.int64).reshape(-1), (c,))
        s = np.broadcast_to(self.tensor(b["s"]).numpy().astype(np.int64).reshape(-1), (c,))
        half = np.where(s > 0, np.left_shift(np.int64(1), np.maximum(s - 1, 0)), 0).astype(np.int64)
        lo, hi = int(b["lo"]), int(b["hi"])
        h = node.name
        products = None if bounds is None else [int(bd) * int(mc) + int(hf) for bd, mc, hf in zip(bounds, m, half)]
        elem, zp, npdtype, _, _ = self.code_type(lo, hi, int(b["bits"]))
        f64 = products is not None and max(products) < (1 << 53)
        if bias is not None and not f64:
            acc = self.node("Add", [acc, self.const(f"{h}_b", bias.numpy().astype(np.int32).reshape(cshape))], f"{h}_bias")
        if f64:
            ratio = (m.astype(np.float64) * np.power(2.0, -s.astype(np.float64))).reshape(cshape)
            offset = np.array(0.5) if bias is None else bias.numpy().astype(np.float64).reshape(cshape) * ratio + 0.5
            v = self.node("Cast", [acc], f"{h}_f64", to=self.TP.DOUBLE)
            v = self.node("Mul", [v, self.const(f"{h}_ratio", ratio)], f"{h}_mul")
            v = self.node("Floor", [self.node("Add", [v, self.const(f"{h}_offset", offset)], f"{h}_round")], f"{h}_floor")
            bounds_ = [self.const("lo_f64", np.array(float(lo))), self.const("hi_f64", np.array(float(hi)))]
            wide = np.float64
        elif products is None:
            div = np.left_shift(np.int64(1), s).astype(np.int64).reshape(cshape)
            d = self.const(f"{h}_div", div)
            v = self.node("Cast", [acc], f"{h}_i64", to=self.TP.INT64)
            v = self.node("Mul", [v, self.const(f"{h}_m", m.reshape(cshape))], f"{h}_mul")
            v = self.node("Add", [v, self.const(f"{h}_half", half.reshape(cshape))], f"{h}_round")
            r = self.node("Mod", [v, d], f"{h}_mod", fmod=0)  # sign of the divisor: v - r is a multiple below v
            v = self.node("Div", [self.node("Sub", [v, r], f"{h}_floor"), d], f"{h}_shift")
            bounds_ = [self.const("lo", np.array(lo, np.int64)), self.const("hi", np.array(hi, np.int64))]
            wide = np.int64
        else:
            div = np.left_shift(np.int64(1), s).astype(np.int64)
            k = np.array([p // int(d) + 1 for p, d in zip(products, div)], dtype=np.int64)
            v = self.node("Cast", [acc], f"{h}_i64", to=self.TP.INT64)
            v = self.node("Mul", [v, self.const(f"{h}_m", m.reshape(cshape))], f"{h}_mul")
            v = self.node("Add", [v, self.const(f"{h}_half_offset", (half + k * div).reshape(cshape))], f"{h}_round")
            v = self.node("Div", [v, self.const(f"{h}_div", div.reshape(cshape))], f"{h}_shift")  # >= 0: truncation is floor
            v = self.node("Sub", [v, self.const(f"{h}_offset", k.reshape(cshape))], f"{h}_floor")
            bounds_ = [self.const("lo", np.array(lo, np.int64)), self.const("hi", np.array(hi, np.int64))]
            wide = np.int64
        v = self.node("Clip", [v, *bounds_], f"{h}_clamp")
        if zp:
            v = self.node("Add", [v, self.const("zp_wide", np.array(zp, wide))], f"{h}_zp")
        v = self.node("Cast", [v], f"{h}_codes", to=elem)
        return _Q(v, float(self.qtype(node).scale), zp, elem, int(b["bits"]), lo, hi)

    def lower_linear(self, node: Node, spec):
        b = spec.bind(node)
        x = self.value(b["x"])
        if not isinstance(x, _Q):
            raise QpipeError(f"onnx-qdq: the input of %{node.name} is not an integer tensor")
        w = self.tensor(b["w"])
        bias = self.tensor(b["bias"])
        rq = spec.kind is OpKind.REQUANTIZE
        out_qt = self.qtype(node) if rq else None
        if rq and self._is_head(node, b) and self.layout.head == "integer":  # MatMulInteger + exact requant
            npdtype = {self.TP.UINT8: np.uint8, self.TP.INT8: np.int8}[x.elem]
            wt = self.const(f"{node.name}_wt", np.ascontiguousarray(w.numpy().astype(np.int8).T))
            acc = self.node("MatMulInteger", [x.name, wt, self.zp_const(x.zp, npdtype)], f"{node.name}_acc")
            return self.integer_requant(node, b, acc, int(w.shape[0]), (int(w.shape[0]),), self.acc_bounds(x, w, bias), bias)
        sw = self._scales(node, b, x, out_qt)
        val = b["x"].meta.get("val")
        nd = val.dim() if isinstance(val, torch.Tensor) else 2
        src = x
        if nd != 2:  # Gemm is 2-D: fold the leading dimensions on the integer codes, unfold after
            shape = self.node("Shape", [x.name], f"{node.name}_shape")
            flat = self.node("Reshape", [x.name, self.const("flat", np.array([-1, int(w.shape[1])], np.int64))], f"{node.name}_2d")
            src = replace(x, name=flat)
        inputs = [self.dq(src, node.name), self._weight_dq(node, w, sw, zero_point=True)]
        bdq = self._bias_dq(node, bias, src, sw, zero_point=True)
        if bdq is not None:
            inputs.append(bdq)
        y = self.node("Gemm", inputs, f"{node.name}_gemm", transB=1)
        out = _R(y) if not rq else self.finish_rq(node, b, y, out_qt)
        if nd != 2:
            lead = self.node("Slice", [shape, self.const("i0", np.array([0], np.int64)), self.const("im1", np.array([-1], np.int64))], f"{node.name}_lead")
            new_shape = self.node("Concat", [lead, self.const(f"{node.name}_n", np.array([int(w.shape[0])], np.int64))], f"{node.name}_nd_shape", axis=0)
            name = self.node("Reshape", [out.name, new_shape], f"{node.name}_nd")
            out = replace(out, name=name)
        return out

    def lower_requant(self, node: Node, spec):
        b = spec.bind(node)
        x = self.value(b["acc"])
        return self.finish_rq(node, b, self.dq(x, node.name), self.qtype(node))

    def lower_add(self, node: Node, spec):
        b = spec.bind(node)
        a, c = self.value(b["a"]), self.value(b["b"])
        sa = sb = None
        if self.match and isinstance(a, _Q) and isinstance(c, _Q) and a.elem == c.elem == self.TP.UINT8:
            out_qt = self.qtype(node)
            lo, hi = int(b["lo"]), int(b["hi"])
            zc = self.code_type(lo, hi, out_qt.bits)[1]
            sa, sb = match_add_scales(
                a.scale, c.scale, float(out_qt.scale),
                int(self.tensor(b["ma"]).reshape(-1)[0]), int(self.tensor(b["mb"]).reshape(-1)[0]),
                int(self.tensor(b["s"]).reshape(-1)[0]), (a.lo, a.hi), (c.lo, c.hi),
                lo, hi, zp=a.zp, zb=c.zp, zc=zc, stats=self.stats,
            )
        y = self.node("Add", [self.dq(a, f"{node.name}_a", sa), self.dq(c, f"{node.name}_b", sb)], f"{node.name}_add")
        return self.finish_rq(node, b, y, self.qtype(node))

    def lower_clamp(self, node: Node, spec):
        b = spec.bind(node)
        x = self.value(b["x"])
        lo, hi = int(b["lo"]), int(b["hi"])
        if not isinstance(x, _Q):
            raise QpipeError(f"onnx-qdq: the input of %{node.name} is not an integer tensor")
        npdtype = {self.TP.UINT8: np.uint8, self.TP.INT8: np.int8, self.TP.INT16: np.int16}[x.elem]
        if self.layout.clamp == "float":  # DQ -> Relu/Clip -> Q at the same scale
            return self.quantize(self.dq(x, node.name), QType.of(x.bits, x.scale), node.name, lo, hi)
        info = np.iinfo(npdtype)
        clo = self.const("clip_lo", np.array(max(lo + x.zp, int(info.min)), npdtype))
        chi = self.const("clip_hi", np.array(min(hi + x.zp, int(info.max)), npdtype))
        return replace(x, name=self.node("Clip", [x.name, clo, chi], f"{node.name}_clip"), lo=max(lo, x.lo), hi=min(hi, x.hi))

    # -- layout (ATen) -------------------------------------------------------------------
    def lower_aten(self, node: Node):
        t = node.target
        if t in (aten.sym_size.int, operator.mul, operator.add, operator.sub, operator.floordiv):
            return ("sym", node)
        if t in ATEN_LOWERINGS:
            return ATEN_LOWERINGS[t](self, node)
        if t is operator.getitem:
            raise QpipeError(f"onnx-qdq: cannot export getitem (%{node.name})")
        x = self.value(node.args[0])
        if not isinstance(x, (_Q, _R)):
            raise QpipeError(f"onnx-qdq: %{node.name} ({t}) reads a non-tensor")
        val = node.args[0].meta.get("val")
        nd = val.dim() if isinstance(val, torch.Tensor) else None
        h = node.name

        def norm(d: int) -> int:
            return d % nd if nd else d

        if t in (aten.contiguous.default, aten.clone.default, aten.alias.default):
            return x
        if t is aten.transpose.int:
            perm = list(range(nd))
            a, c = norm(int(node.args[1])), norm(int(node.args[2]))
            perm[a], perm[c] = perm[c], perm[a]
            return self._like(x, self.node("Transpose", [x.name], h, perm=perm))
        if t is aten.t.default:
            return self._like(x, self.node("Transpose", [x.name], h, perm=[1, 0]) if nd == 2 else x.name)
        if t is aten.permute.default:
            return self._like(x, self.node("Transpose", [x.name], h, perm=[norm(int(d)) for d in node.args[1]]))
        if t is aten.unsqueeze.default:
            d = int(node.args[1]) % (nd + 1)
            return self._like(x, self.node("Unsqueeze", [x.name, self.const("axes", np.array([d], np.int64))], h))
        if t in (aten.squeeze.dim, aten.squeeze.dims):
            dims = node.args[1] if t is aten.squeeze.dims else [node.args[1]]
            dims = [norm(int(d)) for d in dims]
            dims = [d for d in dims if val.shape[d] == 1]
            if not dims:
                return x
            return self._like(x, self.node("Squeeze", [x.name, self.const("axes", np.array(dims, np.int64))], h))
        if t is aten.flatten.using_ints:
            start = norm(int(node.args[1]) if len(node.args) > 1 else 0)
            end = norm(int(node.args[2]) if len(node.args) > 2 else -1)
            out_val = node.meta.get("val")
            return self._like(x, self.reshape(x.name, list(out_val.shape) if out_val is not None else None, node,
                                              flatten=(start, end, nd)))
        if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            return self._like(x, self.reshape(x.name, list(node.args[1]), node))
        if t is aten.slice.Tensor:
            dim = norm(int(node.args[1]) if len(node.args) > 1 else 0)
            start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
            end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else sys.maxsize
            step = int(node.args[4]) if len(node.args) > 4 else 1
            if not all(isinstance(v, int) for v in (start, end)):
                raise QpipeError(f"onnx-qdq: slice with symbolic bounds (%{h}) is not supported")
            end = min(int(end), 2**63 - 1)
            ins = [x.name] + [self.const(n, np.array([v], np.int64)) for n, v in (("starts", start), ("ends", end), ("axes", dim), ("steps", step))]
            return self._like(x, self.node("Slice", ins, h))
        if t is aten.select.int:
            dim, index = norm(int(node.args[1])), int(node.args[2])
            return self._like(x, self.node("Gather", [x.name, self.const("index", np.array(index, np.int64))], h, axis=dim))
        if t is aten.cat.default:
            parts = [self.value(p) for p in node.args[0]]
            dim = int(node.args[1]) if len(node.args) > 1 else 0
            if any(type(p) is not type(parts[0]) for p in parts) or (
                isinstance(parts[0], _Q) and any((p.scale, p.zp, p.elem) != (parts[0].scale, parts[0].zp, parts[0].elem) for p in parts)
            ):
                raise QpipeError(f"onnx-qdq: cat of tensors with different scales (%{h}) is not supported")
            first_val = node.args[0][0].meta.get("val")
            dim = dim % first_val.dim() if first_val is not None else dim
            return self._like(parts[0], self.node("Concat", [p.name for p in parts], h, axis=dim))
        raise QpipeError(f"onnx-qdq: no ONNX lowering for {t} (%{h})")

    def _like(self, x: Union[_Q, _R], name: str):
        return replace(x, name=name)

    def sym_value(self, arg: Any, hint: str) -> str:
        """A 1-element int64 ONNX tensor for an int or a symbolic size node."""
        if isinstance(arg, int):
            return self.const("dim", np.array([arg], np.int64))
        if isinstance(arg, Node):
            v = self.env.get(arg)
            if isinstance(v, tuple) and v[0] == "sym":
                n = v[1]
                if n.target is aten.sym_size.int:
                    src = self.value(n.args[0])
                    d = int(n.args[1])
                    if d == -1:
                        return self.node("Shape", [src.name], f"{hint}_size", start=-1)
                    return self.node("Shape", [src.name], f"{hint}_size", start=d, end=d + 1)
                ops = {operator.mul: "Mul", operator.add: "Add", operator.sub: "Sub", operator.floordiv: "Div"}
                a, c = (self.sym_value(v2, hint) for v2 in n.args)
                return self.node(ops[n.target], [a, c], f"{hint}_sym")
        raise QpipeError(f"onnx-qdq: cannot express the size {arg!r} in ONNX")

    def reshape(self, name: str, sizes: Optional[list], node: Node, flatten=None) -> str:
        if flatten is not None:
            start, end, nd = flatten
            if start == end:
                return name
            shape = self.node("Shape", [name], f"{node.name}_shape")
            parts = []
            if start > 0:
                parts.append(self.node("Slice", [shape, self.const("i0", np.array([0], np.int64)), self.const("is", np.array([start], np.int64))], f"{node.name}_head"))
            parts.append(self.const("m1", np.array([-1], np.int64)))
            if end < nd - 1:
                parts.append(self.node("Slice", [shape, self.const("ie", np.array([end + 1], np.int64)), self.const("iend", np.array([nd], np.int64))], f"{node.name}_tail"))
            target = self.node("Concat", parts, f"{node.name}_target", axis=0) if len(parts) > 1 else parts[0]
            return self.node("Reshape", [name, target], node.name)
        if all(isinstance(s, int) for s in sizes):
            return self.node("Reshape", [name, self.const("shape", np.array(sizes, np.int64))], node.name)
        parts = [self.sym_value(s, node.name) for s in sizes]
        target = self.node("Concat", parts, f"{node.name}_target", axis=0)
        return self.node("Reshape", [name, target], node.name)


def export_onnx(
    gm: GraphModule,
    path: str,
    layout: Union[str, QdqLayout] = "ort",
    *,
    opset: int = OPSET,
    check: bool = True,
) -> ExportInfo:
    """Write the integer graph ``gm`` as an ONNX QDQ model to ``path``; see the module docstring."""
    onnx = _require_onnx()
    if isinstance(layout, str):
        if layout not in LAYOUTS:
            raise QpipeError(f"onnx-qdq: unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        layout = LAYOUTS[layout]
    builder = _Builder(gm, layout)
    model = builder.build(opset)
    if check:
        onnx.checker.check_model(model, full_check=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx.save(model, path)
    outputs = gm.meta.get("qpipe_outputs") or [{"scale": 1.0, "bits": 16}]
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return ExportInfo(
        path=path,
        layout=layout.name,
        output_integer=builder.output_integer,
        output_scale=float(outputs[0]["scale"]),
        output_bits=int(outputs[0].get("bits", 16)),
        op_counts=dict(sorted(counts.items())),
        rounding=builder.stats.to_json() if builder.match else {},
        islands=dict(sorted(builder.islands.items())),
    )


# ---------------------------------------------------------------------------------------------
# running


def ort_available() -> Optional[str]:
    """None when onnxruntime can be imported, else one line that says what is missing."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install onnxruntime)"
    return None


class OnnxQdqRunner:
    """An exported model in ONNX Runtime: float features (B, F, T) -> integer logits.

    The logits are in the reference program's integer units (int16 codes times
    ``output_scale`` are the real logits), so they compare with ``gm(x)``.
    ``threads``: ORT's intra-op threads (0: ORT's default).
    """

    def __init__(self, path: str, threads: int = 0, output_scale: Optional[float] = None,
                 output_bits: int = 16, optimized_model_path: Optional[str] = None):
        missing = ort_available()
        if missing:
            raise QpipeError(missing)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized_model_path:
            opts.optimized_model_filepath = optimized_model_path
        self.session = exact_session(path, opts)  # uint8 weights where this CPU's u8 x s8 kernels saturate
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.output_float = self.session.get_outputs()[0].type == "tensor(float)"
        if self.output_float and output_scale is None:
            raise QpipeError(f"{path}: a float output needs the output scale to become integers")
        self.output_scale = output_scale
        self.output_bits = output_bits

    def run_raw(self, features: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(features, dtype=np.float32)})[0]

    def __call__(self, features: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
        x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features
        y = self.run_raw(x)
        if self.output_float:  # the tensorrt layout: round the real logits onto the reference's grid
            hi = (1 << (self.output_bits - 1)) - 1
            q = np.clip(np.floor(y.astype(np.float64) / self.output_scale + 0.5), -hi, hi)
            return torch.from_numpy(q.astype(np.int16 if self.output_bits <= 16 else np.int32))
        return torch.from_numpy(np.ascontiguousarray(y))

    def logits_int(self, features: torch.Tensor) -> torch.Tensor:
        return self(features)


MODEL_FILE = "model.onnx"
THREADS_ENV = "QPIPE_ORT_THREADS"


@register_target
class OnnxQdqTarget(Target):
    """``--target onnx-qdq``: ``OUT/model.onnx`` in the ``ort`` layout, run by ONNX Runtime (CPU).

    ``QPIPE_ORT_THREADS`` sets ORT's intra-op threads when a folder is opened (default: ORT's).
    """

    name = "onnx-qdq"
    summary = "ONNX QDQ model (model.onnx) that ONNX Runtime's CPU provider runs on integer kernels"
    files = (MODEL_FILE,)
    layout = "ort"

    def available(self) -> tuple[bool, str]:
        missing = ort_available()
        return missing is None, missing or ""

    def write(self, folder: str, gm: GraphModule, record: SaveRecord, example: torch.Tensor) -> None:
        from qpipe.backends.onnx.constants import lifted
        from qpipe.backends.onnx.islands import summary

        with lifted(gm):  # integer constants read as inputs (rel-pos attention's biases) as codes
            info = export_onnx(gm, os.path.join(folder, MODEL_FILE), self.layout)
        # qpipe.json: how each Conformer/Citrinet op was written (integer-exact or a named float island), and how often
        record.extra["onnx"] = {"islands": summary(gm, info.islands)}

    def load(self, folder: str, meta: dict[str, Any]) -> OnnxQdqRunner:
        outputs = meta.get("outputs") or [{}]
        threads = int(os.environ.get(THREADS_ENV, "0") or 0)
        return OnnxQdqRunner(os.path.join(folder, MODEL_FILE), threads=threads,
                             output_scale=outputs[0].get("scale"), output_bits=int(outputs[0].get("bits", 16)))
