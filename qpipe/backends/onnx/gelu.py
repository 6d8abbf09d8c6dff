"""``gelu_int`` (:mod:`qpipe.ir.ops.gelu`).

An 8-bit input: integer-exact, a ``Gather`` from a table of the reference kernel
over the input's 256 codes. A wider one: a float island that computes the
kernel's own erf, I-BERT's polynomial ``sgn(u) (a (min(|u|, -b) + b)**2 + 1)``
with the kernel's Q16-rounded coefficients, in float: ``DequantizeLinear`` ->
``x/2 * (1 + erf(x / sqrt 2))`` -> ``QuantizeLinear`` at the observed scale
(ONNX's ``Erf`` would be the exact erf, up to 2e-2 away from the polynomial the
reference computes)."""
from __future__ import annotations

import math

from torch.fx import Node

from qpipe.backends.onnx.codes import (
    FLOAT_ISLAND, INTEGER, LUT_MAX_BITS, codes, island_in, island_out, record, scalar, table_of_kernel,
)
from qpipe.backends.onnx.registry import lowering
from qpipe.ir.ops.gelu import ERF_A, ERF_B, ONE


@lowering("gelu_int")
def lower_gelu(builder, node: Node, spec):
    args = spec.bind(node)
    xq = codes(builder, node, args["x"], "input")
    if xq.bits <= LUT_MAX_BITS:
        record(builder, "gelu_int", INTEGER)
        return table_of_kernel(builder, node, spec, xq)
    h = node.name
    x = island_in(builder, xq, h)
    u = builder.node("Mul", [x, scalar(builder, "inv_sqrt2", 1.0 / math.sqrt(2.0))], f"{h}_u")
    clip = scalar(builder, "erf_b", ERF_B / ONE)
    w = builder.node("Sub", [builder.node("Min", [builder.node("Abs", [u], f"{h}_abs"), clip], f"{h}_min"), clip], f"{h}_w")
    poly = builder.node("Add", [builder.node("Mul", [builder.node("Mul", [w, w], f"{h}_w2"), scalar(builder, "erf_a", ERF_A / ONE)],
                                             f"{h}_aw2"), scalar(builder, "one", 1.0)], f"{h}_poly")
    erf = builder.node("Mul", [builder.node("Sign", [u], f"{h}_sign"), poly], f"{h}_erf")
    half_x = builder.node("Mul", [x, scalar(builder, "half", 0.5)], f"{h}_halfx")
    y = builder.node("Mul", [half_x, builder.node("Add", [erf, scalar(builder, "one", 1.0)], f"{h}_1erf")], f"{h}_gelu")
    record(builder, "gelu_int", FLOAT_ISLAND)
    return island_out(builder, y, node, int(args["lo"]), int(args["hi"]))
