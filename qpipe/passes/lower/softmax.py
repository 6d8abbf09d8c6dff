"""Softmax (``aten.softmax.int``, ``aten._softmax``): ``qpipe.softmax_int`` over the
same dimension, at the fixed output scale 1/127 (int8) or 1/32767 (int16).

Not observed: the output scale is the kernel's. The input must be an integer
tensor with one scale (a requantized score; int8 or int16, up to 32 bits). The
output width is 8 bits unless the node's own policy (a ``QuantSpec`` in
``meta["qpolicy"]``, written by a precision-policy pass) says 16. The exp
stage's dyadic pair comes from the input scale here, at lowering time.

Attention's ``softmax(masked_fill(scores, mask, -10000))`` becomes one
``qpipe.masked_softmax_int(scores, mask)``: masked positions get exactly 0, as in
float, instead of the exp of the code range's minimum (which at a small score
scale is not small). This happens when the fill is so negative that float's
softmax gives the masked entries no mass at any output width: ``fill + max|x|``
(the input's range in real units) at most ``MASK_MARGIN``; ``exp(-64)`` is below
half a step of a 16-bit probability for rows of up to 2**60 entries.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.fx import Node

from qpipe.ir.opspec import spec_of
from qpipe.ir.qtype import QType
from qpipe.ir.ops.softmax import unit_scale
from qpipe.passes.lower.context import Lowering
from qpipe.passes.lower.nonlinear import exp_pair, per_tensor, policy_bits
from qpipe.passes.lower.table import OpFamily, register_family

aten = torch.ops.aten
SOFTMAX_OPS = frozenset({aten.softmax.int, aten._softmax.default})


MASK_MARGIN = -64.0


def masked_input(node: Node, lw: Lowering) -> Optional[tuple[Node, Node, float]]:
    """``(integer scores, mask, fill)`` when ``node``'s input is ``masked_fill(scores, mask, fill)`` with a fill
    that float's softmax turns into exactly no mass (see the module docstring); else None."""
    src = node.args[0]
    if not (isinstance(src, Node) and src.op == "call_function" and src.target is aten.masked_fill.Scalar):
        return None
    filled = lw.int_of.get(src)
    if filled is None or filled.target is not torch.ops.qpipe.masked_fill_int.default:
        return None
    fill = float(src.args[2])
    values = spec_of(filled).bind(filled)
    xi, mask = values["x"], values["mask"]
    q = lw.qtype(xi)
    if q.per_channel or math.isnan(fill):
        return None
    if fill + q.max_abs * float(q.scale) > MASK_MARGIN:
        return None  # a fill within reach of the scores: keep it a value (masked_fill_int, then softmax_int)
    return xi, mask, fill


def lower_softmax(node: Node, lw: Lowering) -> None:
    dim = int(node.args[1]) if len(node.args) > 1 else int(node.kwargs.get("dim", -1))
    bits = policy_bits(node, 8)
    masked = masked_input(node, lw)
    if masked is not None:
        xi, mask, fill = masked
        q = per_tensor(lw, node, xi)
        m, s = exp_pair(q)
        values = {"x": xi, "mask": mask, "dim": dim, "m": m, "s": s, "bits": bits}
        qp = {"in_scale": float(q.scale), "m": m, "s": s, "bits": bits, "fill": fill}
        out = lw.emit(lw.anchor(node), torch.ops.qpipe.masked_softmax_int.default, values, node,
                      QType.of(bits, unit_scale(bits)), qp)
        lw.bind(node, out)
        lw.count("softmax")
        lw.count("masked_softmax")
        return
    xi = lw.int_input(node, node.args[0])
    q = per_tensor(lw, node, xi)
    m, s = exp_pair(q)
    out = lw.emit(lw.anchor(node), torch.ops.qpipe.softmax_int.default, {"x": xi, "dim": dim, "m": m, "s": s, "bits": bits},
                  node, QType.of(bits, unit_scale(bits)), {"in_scale": float(q.scale), "m": m, "s": s, "bits": bits})
    lw.bind(node, out)
    lw.count("softmax")


SOFTMAX = register_family(OpFamily("softmax", SOFTMAX_OPS, lower_softmax))
