"""``sigmoid_int``, ``silu_int``, ``glu_int`` (:mod:`qpipe.ir.ops.sigmoid`).

An 8-bit input (what the default pipeline gives them) has 256 codes, so the op is
a function of one byte: integer-exact as a ``Gather`` from a table of its own
reference kernel, computed at export (``sigmoid_int``, ``silu_int``); ``glu_int``
looks its Q15 gate up from the second half's codes and multiplies it with the
first half's qpipe units in int64 before the reference's dyadic requantization.

A wider input is a float island:

* ``sigmoid_int``: ``DequantizeLinear`` -> ``Sigmoid`` -> ``QuantizeLinear`` at ``1/H``, ``[0, H]``;
* ``silu_int`` / ``glu_int``: only the gate is float: ``DQ(b)`` -> ``Sigmoid`` -> the
  kernel's Q15 rounding ``floor(g * 2**15 + 1/2)``; the product and the requantization
  are exact int64. The float sigmoid is within the i-exp's 4e-6 of the kernel's, so
  the Q15 gate is sometimes one Q15 step off, which moves the output by a step only
  where the product lies that close to a rounding boundary.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from torch.fx import Node

from qpipe.backends.onnx.codes import (
    FLOAT_ISLAND, INTEGER, LUT_MAX_BITS, bits_range, code_values, codes, island_in, island_out, lookup, rank, record,
    scalar, static_dim, table_of_kernel, to_int64,
)
from qpipe.backends.onnx.registry import lowering
from qpipe.ir.errors import QpipeError
from qpipe.ir.ops.sigmoid import GATE_FRAC, sigmoid_fixed


@lowering("sigmoid_int")
def lower_sigmoid(builder, node: Node, spec):
    args = spec.bind(node)
    x = codes(builder, node, args["x"], "input")
    if x.bits <= LUT_MAX_BITS:
        record(builder, "sigmoid_int", INTEGER)
        return table_of_kernel(builder, node, spec, x)
    y = builder.node("Sigmoid", [island_in(builder, x, node.name)], f"{node.name}_sigmoid")
    record(builder, "sigmoid_int", FLOAT_ISLAND)
    return island_out(builder, y, node, 0, bits_range(int(args["bits"]))[1], implied=True)


def _gate(builder, node: Node, args: dict, b, hint: str) -> tuple[str, str]:
    """The Q15 gate of ``b``'s codes as int64: a table of the kernel's (exact), or the float sigmoid rounded."""
    if b.bits <= LUT_MAX_BITS:
        table = sigmoid_fixed(code_values(builder, b), int(args["m_e"]), int(args["s_e"]), 1 << GATE_FRAC)
        return lookup(builder, b, table.numpy().astype(np.int64), f"{hint}_gate"), INTEGER
    g = builder.node("Sigmoid", [island_in(builder, b, f"{hint}_b")], f"{hint}_gate")
    g = builder.node("Floor", [builder.node("Add", [builder.node("Mul", [g, scalar(builder, "q15", float(1 << GATE_FRAC))],
                                                                 f"{hint}_gate_q15"), scalar(builder, "half", 0.5)],
                                            f"{hint}_gate_half")], f"{hint}_gate_round")
    return builder.node("Cast", [g], f"{hint}_gate_i64", to=builder.TP.INT64), FLOAT_ISLAND


def gated_product(builder, node: Node, args: dict, a, b, hint: str):
    """``a * gate(b)`` as the kernel computes it: the Q15 gate, the exact int64 product, the dyadic requant."""
    if builder.tensor(args["m"]).numel() != 1 or builder.tensor(args["s"]).numel() != 1:
        raise QpipeError(f"onnx-qdq: %{node.name}: a gate with a per-channel pair")
    gate, how = _gate(builder, node, args, b, hint)
    acc = builder.node("Mul", [to_int64(builder, a, hint), gate], f"{hint}_prod")
    return builder.integer_requant(node, args, acc, 1, ()), how


@lowering("silu_int")
def lower_silu(builder, node: Node, spec):
    args = spec.bind(node)
    x = codes(builder, node, args["x"], "input")
    if x.bits <= LUT_MAX_BITS:
        record(builder, "silu_int", INTEGER)
        return table_of_kernel(builder, node, spec, x)
    out, how = gated_product(builder, node, args, x, x, node.name)
    record(builder, "silu_int", how)
    return out


@lowering("glu_int")
def lower_glu(builder, node: Node, spec):
    args = spec.bind(node)
    x = codes(builder, node, args["x"], "input")
    nd = rank(args["x"])
    dim = int(args["dim"]) % nd
    size = static_dim(args["x"], dim)
    if size is None or size % 2:
        raise QpipeError(f"onnx-qdq: %{node.name}: GLU over a symbolic or odd axis")
    half = size // 2

    def part(start: int, hint: str):
        ins = [x.name, builder.const("starts", np.array([start], np.int64)),
               builder.const("ends", np.array([start + half], np.int64)), builder.const("axes", np.array([dim], np.int64))]
        return replace(x, name=builder.node("Slice", ins, f"{node.name}_{hint}"))

    out, how = gated_product(builder, node, args, part(0, "a"), part(half, "b"), node.name)
    record(builder, "glu_int", how)
    return out
