"""ATen ops on the tensors that are not activations: NeMo's masks and lengths, computed
from the input's shape (``full`` of the time size, ``arange < length``, ``expand``,
``logical_not``, ``repeat``, the subsampling's float length arithmetic), and the
``slice`` with symbolic bounds (rel-pos attention's positional slice, ``rel_shift``)
that the builder's own slice does not take.

These tensors are :class:`~qpipe.backends.onnx.codes.Plain` (bool, int64, float32
as the graph has them); the ops are the ONNX ones of the same name, exact
(integers, comparisons, ``Floor`` of small float quotients as aten computes them).
An integer constant (``get_attr`` with a qtype: a folded positional constant) read
by one of them becomes codes in the layout's type. Nothing here is recorded in
``islands``: no quantized value passes through these ops but the slice's, whose
codes it copies.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.fx import Node

from qpipe.backends.onnx.codes import Plain, floor_div, np_dtype
from qpipe.backends.onnx.registry import aten_lowering
from qpipe.backends.onnx.values import QCodes, Real
from qpipe.ir.errors import QpipeError
from qpipe.ir.qtype import qtype_of

aten = torch.ops.aten
_RANK = {"BOOL": 0, "UINT8": 1, "INT8": 1, "INT16": 2, "INT32": 3, "INT64": 4, "FLOAT": 5, "DOUBLE": 6}


def onnx_elem(builder, dtype: torch.dtype) -> int:
    tp = builder.TP
    table = {torch.bool: tp.BOOL, torch.uint8: tp.UINT8, torch.int8: tp.INT8, torch.int16: tp.INT16,
             torch.int32: tp.INT32, torch.int64: tp.INT64, torch.float32: tp.FLOAT, torch.float64: tp.DOUBLE}
    if dtype not in table:
        raise QpipeError(f"onnx-qdq: no ONNX element type for {dtype}")
    return table[dtype]


def out_elem(builder, node: Node) -> int:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise QpipeError(f"onnx-qdq: %{node.name} has no tensor value to type it by")
    return onnx_elem(builder, val.dtype)


def elem_of(builder, v) -> int:
    if isinstance(v, Plain):
        return v.elem
    if isinstance(v, QCodes):
        return v.elem
    return builder.TP.FLOAT


def operand(builder, arg: Any, hint: str):
    """An argument as a value: codes, a real, a :class:`Plain`, or a Python number."""
    if not isinstance(arg, Node):
        return arg
    v = builder.value(arg)
    if isinstance(v, tuple) and v and v[0] == "attr":
        t = builder.tensor(arg)
        qt = qtype_of(arg)
        if qt is not None and not t.is_floating_point():
            if qt.per_channel:
                raise QpipeError(f"onnx-qdq: %{arg.name}: a per-channel constant read by a layout op")
            elem, zp, npdtype = builder.act_type(qt.bits)
            data = (t.to(torch.int64) + zp).numpy().astype(npdtype)
            lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 0)
            return QCodes(builder.const(f"{arg.name}_codes", data), float(qt.scale), zp, elem, qt.bits, lo, hi)
        return Plain(builder.const(arg.name, t.numpy()), onnx_elem(builder, t.dtype))
    if isinstance(v, tuple) and v and v[0] == "sym":
        return Plain(builder.sym_value(arg, hint), builder.TP.INT64)
    return v


def plain(builder, node: Node, arg: Any, elem: int, what: str = "operand") -> str:
    """The ONNX name of ``arg`` as a tensor of ``elem`` (numbers become constants, others are cast)."""
    v = operand(builder, arg, node.name)
    if isinstance(v, QCodes):
        raise QpipeError(f"onnx-qdq: the {what} of %{node.name} ({node.target}) is an integer activation")
    if isinstance(v, (bool, int, float)):
        return builder.const("c", np.array(v, np_dtype(builder, elem)))
    if not isinstance(v, Real):
        raise QpipeError(f"onnx-qdq: the {what} of %{node.name} ({node.target}) is not a tensor: {v!r}")
    if elem_of(builder, v) != elem:
        return builder.node("Cast", [v.name], f"{node.name}_cast", to=elem)
    return v.name


def scalar_of(builder, node: Node, arg: Any, elem: int) -> str:
    """A 0-d tensor of ``elem`` for an int or a symbolic size (Range's operands)."""
    if isinstance(arg, (int, float)):
        return builder.const("c", np.array(arg, np_dtype(builder, elem)))
    name = builder.node("Reshape", [builder.sym_value(arg, node.name), builder.const("scalar_shape", np.array([], np.int64))],
                        f"{node.name}_scalar")
    return name if elem == builder.TP.INT64 else builder.node("Cast", [name], f"{node.name}_scalar_cast", to=elem)


def shape_tensor(builder, node: Node, sizes) -> str:
    sizes = list(sizes)
    if all(isinstance(s, int) for s in sizes):
        return builder.const("shape", np.array(sizes, np.int64))
    return builder.node("Concat", [builder.sym_value(s, node.name) for s in sizes], f"{node.name}_shape", axis=0)


# -- constructors --------------------------------------------------------------------------------


@aten_lowering(aten.zeros.default, aten.ones.default, aten.full.default, aten.new_zeros.default,
               aten.new_ones.default, aten.new_full.default, aten.empty.memory_format)
def lower_fill(builder, node: Node):
    from onnx import helper

    t = node.target
    new = t in (aten.new_zeros.default, aten.new_ones.default, aten.new_full.default)
    sizes = node.args[1] if new else node.args[0]
    elem = out_elem(builder, node)
    if t in (aten.zeros.default, aten.new_zeros.default, aten.empty.memory_format):
        fill: Any = 0
    elif t in (aten.ones.default, aten.new_ones.default):
        fill = 1
    else:
        fill = node.args[2] if new else node.args[1]
    shape = shape_tensor(builder, node, sizes)
    if isinstance(fill, (bool, int, float)):
        value = helper.make_tensor("value", elem, [1], [np.array(fill, np_dtype(builder, elem)).item()])
        return Plain(builder.node("ConstantOfShape", [shape], node.name, value=value), elem)
    return Plain(builder.node("Expand", [scalar_of(builder, node, fill, elem), shape], node.name), elem)


@aten_lowering(aten.arange.default, aten.arange.start, aten.arange.start_step)
def lower_arange(builder, node: Node):
    elem = out_elem(builder, node)
    if node.target is aten.arange.default:
        start, end, step = 0, node.args[0], 1
    else:
        start, end = node.args[0], node.args[1]
        step = node.args[2] if node.target is aten.arange.start_step and len(node.args) > 2 else 1
    ins = [scalar_of(builder, node, v, elem) for v in (start, end, step)]
    return Plain(builder.node("Range", ins, node.name), elem)


# -- layout on masks (and codes) -----------------------------------------------------------------


@aten_lowering(aten.expand.default)
def lower_expand(builder, node: Node):
    x = operand(builder, node.args[0], node.name)
    if not isinstance(x, Real) and not isinstance(x, QCodes):
        raise QpipeError(f"onnx-qdq: %{node.name}: expand of a non-tensor")
    sizes = [1 if (isinstance(s, int) and s == -1) else s for s in node.args[1]]
    return replace(x, name=builder.node("Expand", [x.name, shape_tensor(builder, node, sizes)], node.name))


@aten_lowering(aten.repeat.default)
def lower_repeat(builder, node: Node):
    x = operand(builder, node.args[0], node.name)
    reps = list(node.args[1])
    nd = node.args[0].meta["val"].dim()
    name = x.name
    if len(reps) > nd:
        lead = np.arange(len(reps) - nd, dtype=np.int64)
        name = builder.node("Unsqueeze", [name, builder.const("axes", lead)], f"{node.name}_lead")
    return replace(x, name=builder.node("Tile", [name, shape_tensor(builder, node, reps)], node.name))


@aten_lowering(aten.slice.Tensor)
def lower_slice(builder, node: Node):
    """``x[start:end:step]`` along ``dim`` with int or symbolic bounds, on codes, reals or masks."""
    x = operand(builder, node.args[0], node.name)
    if not isinstance(x, (QCodes, Real)):
        raise QpipeError(f"onnx-qdq: %{node.name} slices a non-tensor")
    nd = node.args[0].meta["val"].dim()
    dim = (int(node.args[1]) if len(node.args) > 1 else 0) % nd
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else sys.maxsize
    step = int(node.args[4]) if len(node.args) > 4 else 1

    def bound(v: Any, hint: str) -> str:
        if isinstance(v, int):
            return builder.const(hint, np.array([min(int(v), 2**63 - 1)], np.int64))
        return builder.sym_value(v, f"{node.name}_{hint}")

    ins = [x.name, bound(start, "starts"), bound(end, "ends"), builder.const("axes", np.array([dim], np.int64)),
           builder.const("steps", np.array([step], np.int64))]
    return replace(x, name=builder.node("Slice", ins, node.name))


@aten_lowering(aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default)
def lower_to(builder, node: Node):
    x = operand(builder, node.args[0], node.name)
    elem = out_elem(builder, node)
    if isinstance(x, QCodes) or not isinstance(x, Real):
        raise QpipeError(f"onnx-qdq: %{node.name}: a dtype conversion of {type(x).__name__}")
    if elem_of(builder, x) == elem:
        return x
    return Plain(builder.node("Cast", [x.name], node.name, to=elem), elem)


# -- arithmetic, comparisons, logic on masks and lengths -----------------------------------------


def _common_elem(builder, node: Node, args) -> int:
    elems = []
    for a in args:
        v = operand(builder, a, node.name)
        if isinstance(v, Real):
            elems.append(elem_of(builder, v))
    if not elems:
        raise QpipeError(f"onnx-qdq: %{node.name}: no tensor operand")
    names = {getattr(builder.TP, k): r for k, r in _RANK.items()}
    elem = max(elems, key=lambda e: names.get(e, 0))
    if any(isinstance(a, float) for a in args) and names.get(elem, 0) < _RANK["FLOAT"]:
        elem = builder.TP.FLOAT
    return elem


_ARITH = {
    aten.add.Tensor: "Add", aten.add.Scalar: "Add", aten.sub.Tensor: "Sub", aten.sub.Scalar: "Sub",
    aten.mul.Tensor: "Mul", aten.mul.Scalar: "Mul", aten.div.Tensor: "Div", aten.div.Scalar: "Div",
    aten.div.Tensor_mode: "Div", aten.div.Scalar_mode: "Div",
    aten.floor_divide.default: "FloorDiv", aten.floor_divide.Scalar: "FloorDiv",
}


@aten_lowering(*_ARITH)
def lower_arith(builder, node: Node):
    elem = out_elem(builder, node)
    a, b = node.args[0], node.args[1]
    av, bv = plain(builder, node, a, elem, "first operand"), plain(builder, node, b, elem, "second operand")
    alpha = node.kwargs.get("alpha", 1)
    if alpha != 1:
        bv = builder.node("Mul", [bv, builder.const("alpha", np.array(alpha, np_dtype(builder, elem)))], f"{node.name}_alpha")
    op = _ARITH[node.target]
    if op == "Div" and node.kwargs.get("rounding_mode") is not None:
        op = "FloorDiv" if node.kwargs["rounding_mode"] == "floor" else "TruncDiv"
    if op == "FloorDiv":
        if elem in (builder.TP.FLOAT, builder.TP.DOUBLE):
            return Plain(builder.node("Floor", [builder.node("Div", [av, bv], f"{node.name}_q")], node.name), elem)
        return Plain(floor_div(builder, av, bv, node.name), elem)
    if op == "TruncDiv":
        q = builder.node("Div", [av, bv], f"{node.name}_q")
        if elem in (builder.TP.FLOAT, builder.TP.DOUBLE):
            q = builder.node("Cast", [builder.node("Cast", [q], f"{node.name}_trunc", to=builder.TP.INT64)], node.name, to=elem)
        return Plain(q, elem)
    return Plain(builder.node(op, [av, bv], node.name), elem)


_COMPARE = {
    aten.lt.Tensor: "Less", aten.lt.Scalar: "Less", aten.le.Tensor: "LessOrEqual", aten.le.Scalar: "LessOrEqual",
    aten.gt.Tensor: "Greater", aten.gt.Scalar: "Greater", aten.ge.Tensor: "GreaterOrEqual",
    aten.ge.Scalar: "GreaterOrEqual", aten.eq.Tensor: "Equal", aten.eq.Scalar: "Equal",
    aten.ne.Tensor: "NotEqual", aten.ne.Scalar: "NotEqual",
}


@aten_lowering(*_COMPARE)
def lower_compare(builder, node: Node):
    elem = _common_elem(builder, node, node.args[:2])
    a, b = (plain(builder, node, v, elem) for v in node.args[:2])
    op = _COMPARE[node.target]
    if op == "NotEqual":
        return Plain(builder.node("Not", [builder.node("Equal", [a, b], f"{node.name}_eq")], node.name), builder.TP.BOOL)
    return Plain(builder.node(op, [a, b], node.name), builder.TP.BOOL)


@aten_lowering(aten.logical_not.default, aten.bitwise_not.default)
def lower_not(builder, node: Node):
    elem = out_elem(builder, node)
    x = plain(builder, node, node.args[0], elem if node.target is aten.bitwise_not.default else builder.TP.BOOL)
    if elem == builder.TP.BOOL:
        return Plain(builder.node("Not", [x], node.name), elem)
    return Plain(builder.node("BitwiseNot", [x], node.name), elem)


_LOGIC = {aten.logical_and.default: "And", aten.logical_or.default: "Or", aten.logical_xor.default: "Xor",
          aten.bitwise_and.Tensor: "And", aten.bitwise_or.Tensor: "Or", aten.bitwise_xor.Tensor: "Xor"}


@aten_lowering(*_LOGIC)
def lower_logic(builder, node: Node):
    elem = out_elem(builder, node)
    if elem != builder.TP.BOOL:
        raise QpipeError(f"onnx-qdq: %{node.name}: bitwise logic on integers is not supported")
    a, b = (plain(builder, node, v, builder.TP.BOOL) for v in node.args[:2])
    return Plain(builder.node(_LOGIC[node.target], [a, b], node.name), elem)


@aten_lowering(aten.where.self)
def lower_where(builder, node: Node):
    elem = out_elem(builder, node)
    cond = plain(builder, node, node.args[0], builder.TP.BOOL, "condition")
    a, b = (plain(builder, node, v, elem) for v in node.args[1:3])
    return Plain(builder.node("Where", [cond, a, b], node.name), elem)


@aten_lowering(aten.sum.dim_IntList, aten.sum.default, aten.amax.default, aten.amin.default)
def lower_reduce(builder, node: Node):
    elem = out_elem(builder, node)
    x = plain(builder, node, node.args[0], elem)
    nd = node.args[0].meta["val"].dim()
    dims = node.args[1] if node.target is not aten.sum.default and len(node.args) > 1 else None
    dims = list(dims) if dims else list(range(nd))  # None or [] reduce over everything
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    op = {aten.amax.default: "ReduceMax", aten.amin.default: "ReduceMin"}.get(node.target, "ReduceSum")
    axes = builder.const("axes", np.array(sorted(int(d) % nd for d in dims), np.int64))
    return Plain(builder.node(op, [x, axes], node.name, keepdims=int(bool(keep))), elem)

