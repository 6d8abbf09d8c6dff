"""``layer_norm_core`` (:mod:`qpipe.ir.ops.layernorm`): integer-exact.

The kernel's own int64 steps over the last axis: ``c = D x - sum(x)``,
``N = sum(c**2) + eps_int``, ``r = isqrt(N << 2j)``, ``q = floor((2 (c << (K+j)) + r) / (2 r))``.
The kernel's Newton iteration (up to 64 rounds) is no short ONNX chain; the
integer square root here is ``floor(sqrt(float64(n)))`` corrected by one step each
way against the exact int64 squares: for ``n < 2**63`` the float64 root is within
2**-20 of the true one, so the floor is off by at most one and the correction
makes it ``isqrt(n)`` exactly.

(A float island, ``LayerNormalization`` on the codes with the kernel's epsilon
``eps_int / D**3``, was a step off on 1e-4 of random int8 rows; in a Conformer such
a step travels on through attention.)
"""
from __future__ import annotations

import numpy as np
from torch.fx import Node

from qpipe.backends.onnx.codes import INTEGER, codes, floor_div, record, static_dim, to_int64
from qpipe.backends.onnx.registry import lowering
from qpipe.backends.onnx.values import QCodes
from qpipe.ir.errors import QpipeError


def isqrt(builder, n: str, hint: str) -> str:
    """``floor(sqrt(n))`` of an int64 tensor ``0 <= n < 2**63``, exactly (see the module docstring)."""
    tp = builder.TP
    r = builder.node("Cast", [builder.node("Floor", [builder.node("Sqrt", [builder.node("Cast", [n], f"{hint}_f64", to=tp.DOUBLE)],
                                                                  f"{hint}_sqrt")], f"{hint}_floor")], f"{hint}_r0", to=tp.INT64)
    one = builder.const("one64", np.array(1, np.int64))
    too_big = builder.node("Greater", [builder.node("Mul", [r, r], f"{hint}_r2"), n], f"{hint}_over")
    r = builder.node("Sub", [r, builder.node("Cast", [too_big], f"{hint}_over_i", to=tp.INT64)], f"{hint}_r1")
    up = builder.node("Add", [r, one], f"{hint}_up")
    fits = builder.node("LessOrEqual", [builder.node("Mul", [up, up], f"{hint}_up2"), n], f"{hint}_fits")
    return builder.node("Add", [r, builder.node("Cast", [fits], f"{hint}_fits_i", to=tp.INT64)], f"{hint}_isqrt")


def integer_layer_norm(builder, node: Node, x: QCodes, d: int, eps_int: int, frac_bits: int, sqrt_shift: int,
                       bits: int) -> QCodes:
    h = node.name
    axes = builder.const("last_axis", np.array([-1], np.int64))
    v = to_int64(builder, x, h)
    c = builder.node("Sub", [builder.node("Mul", [v, builder.const("D", np.array(d, np.int64))], f"{h}_dx"),
                             builder.node("ReduceSum", [v, axes], f"{h}_sum", keepdims=1)], f"{h}_c")
    n = builder.node("Add", [builder.node("ReduceSum", [builder.node("Mul", [c, c], f"{h}_c2"), axes], f"{h}_ssq", keepdims=1),
                             builder.const("eps_int", np.array(int(eps_int), np.int64))], f"{h}_n")
    if sqrt_shift:
        n = builder.node("Mul", [n, builder.const("pow4j", np.array(1 << (2 * sqrt_shift), np.int64))], f"{h}_n_shift")
    r = builder.node("Max", [isqrt(builder, n, h), builder.const("one64", np.array(1, np.int64))], f"{h}_r")
    num = builder.node("Mul", [c, builder.const("pow2kj", np.array(1 << (frac_bits + sqrt_shift), np.int64))], f"{h}_num")
    two = builder.const("two", np.array(2, np.int64))
    q = floor_div(builder, builder.node("Add", [builder.node("Mul", [num, two], f"{h}_2num"), r], f"{h}_num_r"),
                  builder.node("Mul", [r, two], f"{h}_2r"), h)
    elem, zp, _ = builder.act_type(bits)
    if zp:
        q = builder.node("Add", [q, builder.const("zp64", np.array(zp, np.int64))], f"{h}_zp")
    top = 1 << frac_bits
    return QCodes(builder.node("Cast", [q], f"{h}_codes", to=elem), float(builder.qtype(node).scale), zp, elem, bits,
                  -top - 1, top + 1)


@lowering("layer_norm_core")
def lower_layer_norm_core(builder, node: Node, spec):
    args = spec.bind(node)
    x = codes(builder, node, args["x"], "input")
    d = static_dim(args["x"], -1)
    if d is None:
        raise QpipeError(f"onnx-qdq: %{node.name}: LayerNorm over a symbolic axis")
    bits = int(args["bits"])
    record(builder, "layer_norm_core", INTEGER)
    return integer_layer_norm(builder, node, x, d, int(args["eps_int"]), int(args["frac_bits"]), int(args["sqrt_shift"]), bits)
