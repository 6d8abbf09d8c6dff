"""Sigmoid, SiLU, GLU and the product of two activations: the gates of Citrinet's
squeeze-excite and of a Conformer (feed-forward SiLU, the convolution module's
GLU and SiLU).

* ``aten.sigmoid`` -> ``qpipe.sigmoid_int`` at the fixed scale 1/(2**(bits-1)-1);
  not observed. A sigmoid read only by products (a gate) is kept at 16 bits,
  so the product rounds once at its own output; otherwise its policy's bits or 8.
* ``aten.silu`` -> ``qpipe.silu_int``; ``aten.glu`` -> ``qpipe.glu_int`` (over its
  ``dim``): the Q15 gate times the input, one dyadic requantization to the
  observed output scale (a ReLU read only by it folds into its clamp).
* ``aten.mul.Tensor`` of two integer activations -> ``qpipe.mul_requant`` at the
  observed scale. A product with a constant (``x * 0.5``) goes to the handler
  registered for it in :mod:`qpipe.passes.lower.nonlinear` (constants are folded
  into scales by the Conformer work), or fails naming the node.
"""
from __future__ import annotations

import torch
from torch.fx import Node

from qpipe.ir.graph_utils import users_through
from qpipe.ir.ops.softmax import unit_scale
from qpipe.ir.qtype import QType
from qpipe.passes.lower.context import Lowering
from qpipe.passes.lower.nonlinear import (emit_requantized, exp_pair, lower_constant_operand, per_tensor,
                                          policy_bits)
from qpipe.passes.lower.table import OpFamily, register_family, transparent_ops

aten = torch.ops.aten
q = torch.ops.qpipe
GATE_OUT_BITS = 16  # a sigmoid that only gates a product
MUL_OPS = frozenset({aten.mul.Tensor})


def _only_gates(node: Node) -> bool:
    users = users_through(node, transparent_ops())
    return bool(users) and all(u.op == "call_function" and u.target in MUL_OPS for u in users)


def lower_sigmoid(node: Node, lw: Lowering) -> None:
    xi = lw.int_input(node, node.args[0])
    qx = per_tensor(lw, node, xi)
    bits = GATE_OUT_BITS if _only_gates(node) else policy_bits(node, 8)
    m_e, s_e = exp_pair(qx)
    out = lw.emit(lw.anchor(node), q.sigmoid_int.default, {"x": xi, "m_e": m_e, "s_e": s_e, "bits": bits}, node,
                  QType.of(bits, unit_scale(bits)), {"in_scale": float(qx.scale), "m_e": m_e, "s_e": s_e, "bits": bits})
    lw.bind(node, out)
    lw.count("sigmoid")


def lower_silu(node: Node, lw: Lowering) -> None:
    xi = lw.int_input(node, node.args[0])
    qx = per_tensor(lw, node, xi)
    m_e, s_e = exp_pair(qx)
    emit_requantized(lw, node, q.silu_int.default, {"x": xi, "m_e": m_e, "s_e": s_e}, (float(qx.scale),),
                     qx.bits + 16, {"m_e": m_e, "s_e": s_e})
    lw.count("silu")


def lower_glu(node: Node, lw: Lowering) -> None:
    xi = lw.int_input(node, node.args[0])
    qx = per_tensor(lw, node, xi)
    dim = int(node.args[1]) if len(node.args) > 1 else int(node.kwargs.get("dim", -1))
    m_e, s_e = exp_pair(qx)
    emit_requantized(lw, node, q.glu_int.default, {"x": xi, "dim": dim, "m_e": m_e, "s_e": s_e}, (float(qx.scale),),
                     qx.bits + 16, {"m_e": m_e, "s_e": s_e})
    lw.count("glu")


def lower_mul(node: Node, lw: Lowering) -> None:
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, Node) and isinstance(b, Node) and a in lw.int_of and b in lw.int_of):
        lower_constant_operand(node, lw)
        return
    ai, bi = lw.int_input(node, a), lw.int_input(node, b)
    qa, qb = per_tensor(lw, node, ai), per_tensor(lw, node, bi)
    emit_requantized(lw, node, q.mul_requant.default, {"a": ai, "b": bi}, (float(qa.scale), float(qb.scale)),
                     qa.bits + qb.bits + qa.unsigned + qb.unsigned)  # |a*b| < 2**that
    lw.count("mul")


SIGMOID = register_family(OpFamily("sigmoid", frozenset({aten.sigmoid.default}), lower_sigmoid))
SILU = register_family(OpFamily("silu", frozenset({aten.silu.default}), lower_silu, observed=True))
GLU = register_family(OpFamily("glu", frozenset({aten.glu.default}), lower_glu, observed=True))
MUL = register_family(OpFamily("mul", MUL_OPS, lower_mul, observed=True))
