"""``mul_requant`` (:mod:`qpipe.ir.ops.mul`): integer-exact, the int64 product of the two
inputs' qpipe units (broadcast as ONNX and aten both broadcast) and the
reference's dyadic requantization (:meth:`_Builder.integer_requant`)."""
from __future__ import annotations

from torch.fx import Node

from qpipe.backends.onnx.codes import INTEGER, codes, record, to_int64
from qpipe.backends.onnx.registry import lowering
from qpipe.ir.errors import QpipeError


@lowering("mul_requant")
def lower_mul_requant(builder, node: Node, spec):
    args = spec.bind(node)
    a = codes(builder, node, args["a"], "first operand")
    c = codes(builder, node, args["b"], "second operand")
    if builder.tensor(args["m"]).numel() != 1 or builder.tensor(args["s"]).numel() != 1:
        raise QpipeError(f"onnx-qdq: %{node.name}: mul_requant with a per-channel pair")
    acc = builder.node("Mul", [to_int64(builder, a, f"{node.name}_a"), to_int64(builder, c, f"{node.name}_b")],
                       f"{node.name}_prod")
    record(builder, "mul_requant", INTEGER)
    return builder.integer_requant(node, args, acc, 1, ())
