"""``scale_rq``, ``masked_fill_int``, ``pad_int`` (:mod:`qpipe.ir.ops.elementwise`): all integer-exact.

* ``scale_rq``: ``x * w + bias`` in int64 qpipe units (``w``, ``bias`` per channel
  along ``channel_dim``), then the reference's dyadic requantization
  (:meth:`_Builder.integer_requant`: ``(acc*m + 2**(s-1)) >> s`` by ``Mod``/``Div``, clamp);
* ``masked_fill_int``: ``Where(mask, code of value, x)`` on the codes;
* ``pad_int``: ``Pad`` of the codes with the code of the integer ``value``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.fx import Node

from qpipe.backends.onnx.codes import INTEGER, Plain, codes, np_dtype, rank, record, to_int64
from qpipe.backends.onnx.registry import lowering
from qpipe.ir.errors import QpipeError


def _channel_shape(c: int, nd: int, cd: int) -> tuple:
    if c == 1:
        return ()
    shape = [1] * nd
    shape[cd] = c
    return tuple(shape)


@lowering("scale_rq")
def lower_scale_rq(builder, node: Node, spec):
    b = spec.bind(node)
    x = codes(builder, node, b["x"], "input")
    nd = rank(b["x"]) or 1
    cd = int(b["channel_dim"]) % nd
    w = builder.tensor(b["w"]).to(torch.int64).reshape(-1).numpy()
    bias = builder.tensor(b["bias"])
    bias = None if bias is None else bias.to(torch.int64).reshape(-1).numpy()
    sizes = [w.size, builder.tensor(b["m"]).numel(), builder.tensor(b["s"]).numel()] + ([bias.size] if bias is not None else [])
    c = max(sizes)
    if any(n not in (1, c) for n in sizes):
        raise QpipeError(f"onnx-qdq: %{node.name}: per-channel constants of different lengths {sizes}")
    cshape = _channel_shape(c, nd, cd)
    acc = to_int64(builder, x, node.name)
    if not (w.size == 1 and int(w[0]) == 1):
        wv = np.broadcast_to(w, (c,)).reshape(cshape) if w.size > 1 else w.reshape(())
        acc = builder.node("Mul", [acc, builder.const(f"{node.name}_w", np.ascontiguousarray(wv, np.int64))], f"{node.name}_w")
    if bias is not None:
        bv = np.broadcast_to(bias, (c,)).reshape(cshape) if bias.size > 1 else bias.reshape(())
        acc = builder.node("Add", [acc, builder.const(f"{node.name}_bias", np.ascontiguousarray(bv, np.int64))], f"{node.name}_bias")
    record(builder, "scale_rq", INTEGER)
    return builder.integer_requant(node, b, acc, c, cshape)


def mask_input(builder, node: Node, arg) -> str:
    """The ONNX name of a bool mask: a graph constant, or a tensor computed from the shapes (:class:`Plain`)."""
    v = builder.value(arg)
    if isinstance(v, tuple) and v and v[0] == "attr":
        return builder.const(f"{node.name}_mask", builder.tensor(arg).to(torch.bool).numpy())
    if isinstance(v, Plain) and v.elem == builder.TP.BOOL:
        return v.name
    if isinstance(v, Plain):
        return builder.node("Cast", [v.name], f"{node.name}_mask", to=builder.TP.BOOL)
    raise QpipeError(f"onnx-qdq: the mask of %{node.name} is not a bool tensor ({type(v).__name__})")


def _on_codes(builder, x, op: str, inputs: list, value: int, hint: str, **attrs) -> str:
    """``op`` on the codes of ``x`` with the code of ``value`` as its constant; int16 codes go
    through int32 (ONNX Runtime's CPU provider has no int16 ``Where`` or ``Pad``)."""
    wide = x.elem == builder.TP.INT16
    elem = builder.TP.INT32 if wide else x.elem
    src = builder.node("Cast", [x.name], f"{hint}_i32", to=elem) if wide else x.name
    fill = builder.const("fill", np.array(value + x.zp, np_dtype(builder, elem)))
    names = [src if n == "x" else fill if n == "value" else n for n in inputs]
    out = builder.node(op, names, hint if not wide else f"{hint}_wide", **attrs)
    return builder.node("Cast", [out], hint, to=x.elem) if wide else out


@lowering("masked_fill_int")
def lower_masked_fill(builder, node: Node, spec):
    b = spec.bind(node)
    x = codes(builder, node, b["x"], "input")
    value = int(b["value"])
    out = _on_codes(builder, x, "Where", [mask_input(builder, node, b["mask"]), "value", "x"], value, node.name)
    record(builder, "masked_fill_int", INTEGER)
    return type(x)(out, x.scale, x.zp, x.elem, x.bits, min(x.lo, value), max(x.hi, value))


@lowering("pad_int")
def lower_pad(builder, node: Node, spec):
    b = spec.bind(node)
    x = codes(builder, node, b["x"], "input")
    pad = [int(p) for p in b["pad"]]
    nd = rank(b["x"])
    if nd is None or len(pad) % 2 or len(pad) // 2 > nd:
        raise QpipeError(f"onnx-qdq: %{node.name}: pad {pad} does not fit the input's rank")
    begins, ends = [0] * nd, [0] * nd
    for i in range(len(pad) // 2):  # aten order: the last axis first, (begin, end) each
        begins[nd - 1 - i], ends[nd - 1 - i] = pad[2 * i], pad[2 * i + 1]
    value = int(b["value"])
    pads = builder.const("pads", np.array(begins + ends, np.int64))
    out = _on_codes(builder, x, "Pad", ["x", pads, "value"], value, node.name, mode="constant")
    record(builder, "pad_int", INTEGER)
    return type(x)(out, x.scale, x.zp, x.elem, x.bits, min(x.lo, value), max(x.hi, value))
