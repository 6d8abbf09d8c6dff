"""``matmul_rq`` / ``matmul_acc`` (:mod:`qpipe.ir.ops.matmul`): integer-exact.

Two 8-bit operands are one ``MatMulInteger`` of their codes with their zero
points (the exact int32 accumulator, what the reference's exact float matmul
gives), wider ones an int64 ``MatMul`` of the qpipe units. ``matmul_rq`` then
requantizes in int64 exactly as the reference does
(:meth:`_Builder.integer_requant`). ``matmul_acc`` (an unfused pipeline) hands on
the accumulator as a float real ``acc * S_a * S_b``, as the builder's conv and
linear accumulators do; the ``requant`` after it is the builder's own
(a ``QuantizeLinear``), so only the fused ``matmul_rq`` is exact end to end.
"""
from __future__ import annotations

import numpy as np
from torch.fx import Node

from qpipe.backends.onnx.codes import INTEGER, codes, np_dtype, record, to_int64
from qpipe.backends.onnx.registry import lowering
from qpipe.backends.onnx.values import Real


def accumulate(builder, node: Node, args: dict) -> str:
    """The exact accumulator of ``a @ b``: int32 (MatMulInteger) or int64 (MatMul of qpipe units)."""
    a = codes(builder, node, args["a"], "first operand")
    c = codes(builder, node, args["b"], "second operand")
    tp = builder.TP
    if a.elem in (tp.UINT8, tp.INT8) and c.elem in (tp.UINT8, tp.INT8):
        zps = [builder.zp_const(v.zp, np_dtype(builder, v.elem)) for v in (a, c)]
        return builder.node("MatMulInteger", [a.name, c.name, *zps], f"{node.name}_acc")
    return builder.node("MatMul", [to_int64(builder, a, f"{node.name}_a"), to_int64(builder, c, f"{node.name}_b")],
                        f"{node.name}_acc")


@lowering("matmul_rq")
def lower_matmul_rq(builder, node: Node, spec):
    args = spec.bind(node)
    acc = accumulate(builder, node, args)
    record(builder, "matmul_rq", INTEGER)
    return builder.integer_requant(node, args, acc, 1, ())


@lowering("matmul_acc")
def lower_matmul_acc(builder, node: Node, spec):
    args = spec.bind(node)
    a, c = builder.value(args["a"]), builder.value(args["b"])
    acc = accumulate(builder, node, args)
    real = builder.node("Cast", [acc], f"{node.name}_f32", to=builder.TP.FLOAT)
    real = builder.node("Mul", [real, builder.const("acc_scale", np.array(a.scale * c.scale, np.float32))],
                        f"{node.name}_real")
    record(builder, "matmul_acc", INTEGER)
    return Real(real)
