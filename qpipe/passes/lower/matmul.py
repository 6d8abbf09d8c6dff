"""Matmul of two integer activations (attention's Q K^T, attention x V): an exact
``qpipe.matmul_acc`` at S_a * S_b, then a dyadic ``requant`` to the observed scale.
A float constant operand (positional encodings) is quantized first (``constants``)."""
from __future__ import annotations

import torch
from torch.fx import Node

from qpipe.ir.qtype import QType
from qpipe.passes.lower.context import Lowering
from qpipe.passes.lower.table import OpFamily, register_family

aten = torch.ops.aten
MATMUL_OPS = frozenset({aten.matmul.default, aten.bmm.default})


def accumulator_bits(a_max: int, b_max: int, reduction: int) -> tuple[int, int]:
    """(bits, bound): 32 when ``max|a| * max|b| * K`` fits in int32, else 64."""
    bound = int(a_max) * int(b_max) * max(int(reduction), 1)
    return (32 if bound < 2**31 else 64), bound


def reduction_bound(k) -> int:
    """A reduction length, or the upper bound export proved for a symbolic one (attention x V runs over time)."""
    if isinstance(k, int):
        return k
    try:
        return int(k.node.shape_env.bound_sympy(k.node.expr).upper)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return 2**31  # unbounded: a 64-bit accumulator


def lower_matmul(node: Node, lw: Lowering) -> None:
    ai, bi = lw.int_input(node, node.args[0]), lw.int_input(node, node.args[1])
    qa, qb = lw.qtype(ai), lw.qtype(bi)
    reduction = node.args[0].meta["val"].shape[-1]
    reduction = reduction_bound(reduction)
    acc_bits, bound = accumulator_bits(qa.max_abs, qb.max_abs, reduction)
    before = lw.anchor(node)
    acc_scale = float(qa.scale) * float(qb.scale)
    acc_q = {"a_scale": float(qa.scale), "b_scale": float(qb.scale), "acc_bound": bound, "acc_bits": acc_bits}
    acc = lw.emit(before, torch.ops.qpipe.matmul_acc.default, {"a": ai, "b": bi, "acc_bits": acc_bits}, node,
                  QType.of(acc_bits, acc_scale), acc_q)
    lw.requant_after(node, acc, before, channel_dim=node.meta["val"].dim() - 1)
    lw.count("matmul")


MATMUL = register_family(OpFamily("matmul", MATMUL_OPS, lower_matmul, observed=True))
