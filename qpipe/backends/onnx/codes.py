"""What the onnx-qdq lowerings of :mod:`qpipe.backends.onnx.islands` share: codes to and
from int64 qpipe units, the float island's two ends, and the tensors that are
neither (masks, counts).

An integer-exact lowering reads a :class:`QCodes` as int64 *qpipe units*
(``Cast``, minus the zero point: the ``ort`` layout's uint8 codes are qpipe's
int8 plus 128), computes what the reference kernel computes in int64 ONNX ops,
and writes codes back (qpipe's clamp, plus the zero point, ``Cast``). A float
island is ``DequantizeLinear`` -> float ONNX ops -> ``QuantizeLinear`` at the
op's output qtype (:meth:`_Builder.quantize`, which puts qpipe's clamp where the
layout wants it); its QuantizeLinear rounds half to even where qpipe rounds half
up, which is one more reason (besides the float op itself) that an island can be
a step off the reference.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np
import torch
from torch.fx import Node

from qpipe.backends.onnx.values import QCodes, Real
from qpipe.ir.errors import QpipeError

INTEGER = "integer"
FLOAT_ISLAND = "float island"


@dataclass
class Plain(Real):
    """A tensor of the graph that is not a quantized activation: a bool mask, an int64
    count or index computed from the input's shape. ``elem``: its ONNX element type.
    (A :class:`Real` so that the builder's layout lowerings pass it through.)"""

    elem: int = 0


def record(builder, name: str, how: str) -> None:
    """``builder.islands[name]``: how op ``name`` was written; an op written both ways says so."""
    old = builder.islands.get(name)
    builder.islands[name] = how if old in (None, how) else f"{old} + {how}"


def np_dtype(builder, elem: int):
    tp = builder.TP
    table = {tp.UINT8: np.uint8, tp.INT8: np.int8, tp.INT16: np.int16, tp.INT32: np.int32, tp.INT64: np.int64,
             tp.BOOL: np.bool_, tp.FLOAT: np.float32, tp.DOUBLE: np.float64}
    if elem not in table:
        raise QpipeError(f"onnx-qdq: no numpy type for ONNX element type {elem}")
    return table[elem]


def codes(builder, node: Node, arg: Any, what: str) -> QCodes:
    """The integer codes of ``arg`` (an input of ``node``), or a one-line error."""
    v = builder.value(arg)
    if not isinstance(v, QCodes):
        raise QpipeError(f"onnx-qdq: the {what} of %{node.name} is not an integer tensor")
    return v


def to_int64(builder, v: QCodes, hint: str) -> str:
    """``v``'s codes as int64 qpipe units: ``Cast`` minus the zero point."""
    x = builder.node("Cast", [v.name], f"{hint}_i64", to=builder.TP.INT64)
    if v.zp:
        x = builder.node("Sub", [x, builder.const("zp64", np.array(v.zp, np.int64))], f"{hint}_unzp")
    return x


def from_int64(builder, x: str, node: Node, lo: int, hi: int, bits: int, hint: Optional[str] = None) -> QCodes:
    """int64 qpipe units ``x`` -> the codes of ``node``'s qtype: Clip to [lo, hi], plus the zero point, Cast."""
    hint = hint or node.name
    x = builder.node("Clip", [x, builder.const("lo", np.array(lo, np.int64)), builder.const("hi", np.array(hi, np.int64))],
                     f"{hint}_clamp")
    elem, zp, _ = builder.act_type(bits)
    if zp:
        x = builder.node("Add", [x, builder.const("zp64", np.array(zp, np.int64))], f"{hint}_zp")
    return QCodes(builder.node("Cast", [x], f"{hint}_codes", to=elem), float(builder.qtype(node).scale), zp, elem, bits,
                  lo, hi)


def floor_div(builder, num: str, den: str, hint: str) -> str:
    """``floor(num / den)`` of int64 tensors, ``den > 0`` (ONNX's integer Div truncates: take the
    floor remainder ``Mod(fmod=0)`` off first, as :meth:`_Builder.integer_requant` does)."""
    r = builder.node("Mod", [num, den], f"{hint}_mod", fmod=0)
    return builder.node("Div", [builder.node("Sub", [num, r], f"{hint}_exact"), den], f"{hint}_div")


def bits_range(bits: int) -> tuple[int, int]:
    hi = (1 << (int(bits) - 1)) - 1
    return -hi, hi


def island_in(builder, v, hint: str, scale: Optional[float] = None) -> str:
    """The float island's entrance: ``DequantizeLinear`` (``scale``: a scale of its own, e.g. 1.0 for
    the codes themselves in float)."""
    if not isinstance(v, (QCodes, Real)) or isinstance(v, Plain):
        raise QpipeError(f"onnx-qdq: {hint}: a float island needs an activation")
    return builder.dq(v, hint, scale)


def island_out(builder, real: str, node: Node, lo: int, hi: int, implied: bool = False) -> QCodes:
    """The float island's exit: ``QuantizeLinear`` at ``node``'s qtype with qpipe's clamp [lo, hi].

    ``implied``: the float op stays within [lo, hi] by itself (a probability, a normalized value),
    so no clamp is written. A 16-bit output is clamped in float before the QuantizeLinear
    (ONNX Runtime's CPU provider has no int16 ``Clip``); ``lo * scale`` quantizes back to ``lo``."""
    qt = builder.qtype(node)
    _, zp, npdtype = builder.act_type(qt.bits)
    info = np.iinfo(npdtype)
    code_lo, code_hi = int(info.min) - zp, int(info.max) - zp
    if implied:
        q = builder.quantize(real, qt, node.name, code_lo, code_hi)
        return replace(q, lo=int(lo), hi=int(hi))
    if qt.bits > 8 and (lo > code_lo or hi < code_hi):
        scale = float(qt.scale)
        flo = np.float32(lo * scale) if lo > code_lo else np.float32(-np.inf)
        fhi = np.float32(hi * scale) if hi < code_hi else np.float32(np.inf)
        real = builder.node("Clip", [real, builder.const("flo", np.array(flo)), builder.const("fhi", np.array(fhi))],
                            f"{node.name}_fclip")
        return replace(builder.quantize(real, qt, node.name, code_lo, code_hi), lo=int(lo), hi=int(hi))
    return builder.quantize(real, qt, node.name, int(lo), int(hi))


def scalar(builder, hint: str, value: float) -> str:
    return builder.const(hint, np.array(value, np.float32))


def static_dim(node_arg: Any, dim: int) -> Optional[int]:
    """The size of ``dim`` of an fx node's value when it is a plain int, else None."""
    val = node_arg.meta.get("val") if isinstance(node_arg, Node) else None
    if val is None:
        return None
    d = val.shape[dim]
    return int(d) if isinstance(d, int) else None


def rank(node_arg: Any) -> Optional[int]:
    val = node_arg.meta.get("val") if isinstance(node_arg, Node) else None
    return val.dim() if val is not None and hasattr(val, "dim") else None


LUT_MAX_BITS = 8  # an elementwise op of one input this narrow is a table of its reference kernel


def code_values(builder, v: QCodes) -> torch.Tensor:
    """Every qpipe value a code of ``v``'s ONNX type can hold (int64, ascending): a table's domain."""
    info = np.iinfo(np_dtype(builder, v.elem))
    return torch.arange(int(info.min) - v.zp, int(info.max) - v.zp + 1, dtype=torch.int64)


def lookup(builder, v: QCodes, table: np.ndarray, hint: str) -> str:
    """``table[code]``: ``Gather`` of a table indexed by ``v``'s codes (entry ``i`` for the
    ``i``-th value of :func:`code_values`), exact for any function of one 8-bit input."""
    info = np.iinfo(np_dtype(builder, v.elem))
    idx = builder.node("Cast", [v.name], f"{hint}_index", to=builder.TP.INT64)
    if int(info.min):
        idx = builder.node("Sub", [idx, builder.const("code_min", np.array(int(info.min), np.int64))], f"{hint}_index0")
    return builder.node("Gather", [builder.const(f"{hint}_table", np.ascontiguousarray(table)), idx], f"{hint}_lookup", axis=0)


def output_codes(builder, node: Node, values: torch.Tensor) -> tuple[np.ndarray, int, int]:
    """qpipe output values of ``node`` as its ONNX codes: (array, elem, zp)."""
    elem, zp, npdtype = builder.act_type(builder.qtype(node).bits)
    return (values.to(torch.int64) + zp).numpy().astype(npdtype), elem, zp


def table_of_kernel(builder, node: Node, spec, x: QCodes, input_name: str = "x") -> QCodes:
    """``node``'s op as a lookup table of its own reference kernel over every code of ``x``
    (the op's other arguments as the node has them): integer-exact by construction."""
    from qpipe.ir.ops.kernels import dtype_for_bits

    bound = spec.bind(node)
    domain = code_values(builder, x).to(dtype_for_bits(x.bits))
    call = [domain if name == input_name else
            builder.tensor(v) if isinstance(v, Node) else v for name, v in bound.items()]
    values = spec.op(*call).to(torch.int64)
    table, elem, zp = output_codes(builder, node, values)
    return QCodes(lookup(builder, x, table, node.name), float(builder.qtype(node).scale), zp, elem,
                  builder.qtype(node).bits, int(values.min()), int(values.max()))
