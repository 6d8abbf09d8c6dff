"""``softmax_int`` and ``masked_softmax_int`` (:mod:`qpipe.ir.ops.softmax`).

An 8-bit input (the requantized scores of attention): integer-exact in int64,
the kernel's own steps: the max-subtraction ``k = max(x) - x`` (``ReduceMax``,
``Sub`` on the codes: the zero point cancels), the Q20 i-exp as a ``Gather``
from a table of :func:`~qpipe.ir.ops.iexp.exp_fixed` over the 256 possible
``k`` (computed at export), ``ReduceSum``, and the exact round-half-up division
``floor((2 e H + sum) / (2 sum))`` (``Div`` of non-negative int64 is the floor).

``masked_softmax_int`` is the same with the kernel's mask inside: the max and the
sum over the unmasked entries (``Where`` on the broadcast mask, ``ReduceMax`` of the
kept codes), masked entries exactly 0, a row with every entry masked uniform.

A wider input is a float island: ``DequantizeLinear`` -> ``Softmax`` over the same
axis -> ``QuantizeLinear`` at the fixed output scale ``1/H`` with the range
``[0, H]``; it differs from the kernel by the i-exp's error (4e-6 relative) and
the output's tie rule (half to even against half up): at most a step.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.fx import Node

from qpipe.backends.onnx.codes import (
    FLOAT_ISLAND, INTEGER, LUT_MAX_BITS, bits_range, codes, island_in, island_out, np_dtype, rank, record,
)
from qpipe.backends.onnx.registry import lowering
from qpipe.backends.onnx.values import QCodes
from qpipe.ir.ops.iexp import exp_fixed


def integer_softmax(builder, node: Node, x: QCodes, dim: int, m: int, s: int, bits: int) -> QCodes:
    """The kernel's softmax over ``dim`` of 8-bit codes, exactly (see the module docstring)."""
    h = node.name
    info = np.iinfo(np_dtype(builder, x.elem))
    span = int(info.max) - int(info.min)
    table = exp_fixed(-torch.arange(span + 1, dtype=torch.int64), m, s).numpy().astype(np.int64)
    axes = builder.const("axes", np.array([dim], np.int64))
    c = builder.node("Cast", [x.name], f"{h}_i64", to=builder.TP.INT64)
    k = builder.node("Sub", [builder.node("ReduceMax", [c, axes], f"{h}_max", keepdims=1), c], f"{h}_k")
    e = builder.node("Gather", [builder.const(f"{h}_exp_table", table), k], f"{h}_exp", axis=0)
    total = builder.node("ReduceSum", [e, axes], f"{h}_sum", keepdims=1)
    top = (1 << (bits - 1)) - 1
    num = builder.node("Add", [builder.node("Mul", [e, builder.const("two_h", np.array(2 * top, np.int64))], f"{h}_2eh"), total],
                       f"{h}_num")
    q = builder.node("Div", [num, builder.node("Mul", [total, builder.const("two", np.array(2, np.int64))], f"{h}_2sum")],
                     f"{h}_div")
    elem, zp, _ = builder.act_type(bits)
    if zp:
        q = builder.node("Add", [q, builder.const("zp64", np.array(zp, np.int64))], f"{h}_zp")
    return QCodes(builder.node("Cast", [q], f"{h}_codes", to=elem), float(builder.qtype(node).scale), zp, elem, bits, 0, top)


@lowering("softmax_int")
def lower_softmax(builder, node: Node, spec):
    args = spec.bind(node)
    x = codes(builder, node, args["x"], "input")
    bits = int(args["bits"])
    if x.bits <= LUT_MAX_BITS:
        record(builder, "softmax_int", INTEGER)
        return integer_softmax(builder, node, x, int(args["dim"]) % rank(args["x"]), int(args["m"]), int(args["s"]), bits)
    y = builder.node("Softmax", [island_in(builder, x, node.name)], f"{node.name}_softmax", axis=int(args["dim"]))
    record(builder, "softmax_int", FLOAT_ISLAND)
    return island_out(builder, y, node, 0, bits_range(bits)[1], implied=True)


def _mask_parts(builder, node: Node, x: QCodes, mask_arg, axes: str) -> tuple[str, str]:
    """(drop, every) as the kernel has them: the mask broadcast to ``x``, its rows that are all masked
    (``every``, kept: uniform), and the entries dropped from the other rows (``drop``)."""
    from qpipe.backends.onnx.elementwise import mask_input

    h = node.name
    mask = builder.node("Expand", [mask_input(builder, node, mask_arg), builder.node("Shape", [x.name], f"{h}_shape")],
                        f"{h}_mask")
    every = builder.node("Cast", [builder.node("ReduceMin", [builder.node("Cast", [mask], f"{h}_mask_i", to=builder.TP.INT64),
                                                             axes], f"{h}_all", keepdims=1)], f"{h}_every", to=builder.TP.BOOL)
    drop = builder.node("And", [mask, builder.node("Not", [every], f"{h}_some")], f"{h}_drop")
    return drop, every


def integer_masked_softmax(builder, node: Node, x: QCodes, mask_arg, dim: int, m: int, s: int, bits: int) -> QCodes:
    """The kernel's masked softmax of 8-bit codes, exactly: max and sum over the unmasked entries,
    masked ones 0, all-masked rows uniform."""
    h = node.name
    info = np.iinfo(np_dtype(builder, x.elem))
    table = exp_fixed(-torch.arange(int(info.max) - int(info.min) + 1, dtype=torch.int64), m, s).numpy().astype(np.int64)
    axes = builder.const("axes", np.array([dim], np.int64))
    drop, every = _mask_parts(builder, node, x, mask_arg, axes)
    zero = builder.const("zero64", np.array(0, np.int64))
    c = builder.node("Cast", [x.name], f"{h}_i64", to=builder.TP.INT64)
    low = builder.const("int64_min", np.array(np.iinfo(np.int64).min, np.int64))
    top = builder.node("ReduceMax", [builder.node("Where", [drop, low, c], f"{h}_kept"), axes], f"{h}_max", keepdims=1)
    top = builder.node("Where", [every, zero, top], f"{h}_top")
    still = builder.node("Or", [drop, every], f"{h}_flat")
    k = builder.node("Where", [still, zero, builder.node("Sub", [top, c], f"{h}_d")], f"{h}_k")
    e = builder.node("Gather", [builder.const(f"{h}_exp_table", table), k], f"{h}_exp", axis=0)
    e = builder.node("Where", [drop, zero, e], f"{h}_e")
    total = builder.node("ReduceSum", [e, axes], f"{h}_sum", keepdims=1)
    top_code = (1 << (bits - 1)) - 1
    num = builder.node("Add", [builder.node("Mul", [e, builder.const("two_h", np.array(2 * top_code, np.int64))], f"{h}_2eh"),
                               total], f"{h}_num")
    q = builder.node("Div", [num, builder.node("Mul", [total, builder.const("two", np.array(2, np.int64))], f"{h}_2sum")],
                     f"{h}_div")
    elem, zp, _ = builder.act_type(bits)
    if zp:
        q = builder.node("Add", [q, builder.const("zp64", np.array(zp, np.int64))], f"{h}_zp")
    return QCodes(builder.node("Cast", [q], f"{h}_codes", to=elem), float(builder.qtype(node).scale), zp, elem, bits, 0,
                  top_code)


@lowering("masked_softmax_int")
def lower_masked_softmax(builder, node: Node, spec):
    """Integer-exact for 8-bit scores; wider: a float island, ``Softmax`` of ``DQ(x)`` with the dropped
    entries at ``-inf`` (and all-masked rows at 0: uniform) -> ``QuantizeLinear``."""
    args = spec.bind(node)
    x = codes(builder, node, args["x"], "input")
    bits = int(args["bits"])
    dim = int(args["dim"]) % rank(args["x"])
    if x.bits <= LUT_MAX_BITS:
        record(builder, "masked_softmax_int", INTEGER)
        return integer_masked_softmax(builder, node, x, args["mask"], dim, int(args["m"]), int(args["s"]), bits)
    axes = builder.const("axes", np.array([dim], np.int64))
    drop, every = _mask_parts(builder, node, x, args["mask"], axes)
    real = island_in(builder, x, node.name)
    real = builder.node("Where", [drop, builder.const("minus_inf", np.array(-np.inf, np.float32)), real], f"{node.name}_drop")
    real = builder.node("Where", [every, builder.const("zero_f", np.array(0.0, np.float32)), real], f"{node.name}_every")
    y = builder.node("Softmax", [real], f"{node.name}_softmax", axis=dim)
    record(builder, "masked_softmax_int", FLOAT_ISLAND)
    return island_out(builder, y, node, 0, bits_range(bits)[1], implied=True)
