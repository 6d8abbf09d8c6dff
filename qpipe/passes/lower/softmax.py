"""Softmax (``aten.softmax.int``, ``aten._softmax``): ``qpipe.softmax_int`` over the
same dimension, at the fixed output scale 1/127 (int8) or 1/32767 (int16).

Not observed: the output scale is the kernel's. The input must be an integer
tensor with one scale (a requantized score; int8 or int16, up to 32 bits). The
output width is 8 bits unless the node's own policy (a ``QuantSpec`` in
``meta["qpolicy"]``, written by a precision-policy pass) says 16. The exp
stage's dyadic pair comes from the input scale here, at lowering time.
"""
from __future__ import annotations

import torch
from torch.fx import Node

from qpipe.ir.qtype import QType
from qpipe.ir.ops.softmax import unit_scale
from qpipe.passes.lower.context import Lowering
from qpipe.passes.lower.nonlinear import exp_pair, per_tensor, policy_bits
from qpipe.passes.lower.table import OpFamily, register_family

aten = torch.ops.aten
SOFTMAX_OPS = frozenset({aten.softmax.int, aten._softmax.default})


def lower_softmax(node: Node, lw: Lowering) -> None:
    xi = lw.int_input(node, node.args[0])
    q = per_tensor(lw, node, xi)
    dim = int(node.args[1]) if len(node.args) > 1 else int(node.kwargs.get("dim", -1))
    bits = policy_bits(node, 8)
    m, s = exp_pair(q)
    out = lw.emit(lw.anchor(node), torch.ops.qpipe.softmax_int.default, {"x": xi, "dim": dim, "m": m, "s": s, "bits": bits},
                  node, QType.of(bits, unit_scale(bits)), {"in_scale": float(q.scale), "m": m, "s": s, "bits": bits})
    lw.bind(node, out)
    lw.count("softmax")


SOFTMAX = register_family(OpFamily("softmax", SOFTMAX_OPS, lower_softmax))
