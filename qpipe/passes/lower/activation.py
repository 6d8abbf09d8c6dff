"""ReLU, hardtanh and clamp: a clamp in real units. Read by one producer, it folds
into that producer's requantization; otherwise it is an integer clamp at the
unchanged scale."""
from __future__ import annotations

import torch
from torch.fx import Node

from qpipe.passes.lower.context import Lowering
from qpipe.passes.lower.table import OpFamily, register_family

aten = torch.ops.aten
ACTIVATION_OPS = frozenset({aten.relu.default, aten.hardtanh.default, aten.clamp.default})


def activation_bounds(node: Node) -> tuple[float, float]:
    """The real-valued clamp an activation node applies."""
    if node.target is aten.relu.default:
        return 0.0, float("inf")
    if node.target is aten.hardtanh.default:
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        return float(lo), float(hi)
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    return (float("-inf") if lo is None else float(lo)), (float("inf") if hi is None else float(hi))


def lower_activation(node: Node, lw: Lowering) -> None:
    if node in lw.int_of:  # already folded into its producer's requantization
        return
    xi = lw.int_input(node, node.args[0])
    q = lw.qtype(xi)
    lo, hi = lw.int_bounds(q.bits, float(q.scale), node, q.unsigned)
    out = lw.emit(lw.anchor(node), torch.ops.qpipe.clamp_int.default, {"x": xi, "lo": lo, "hi": hi}, node, q,
                  {"lo": lo, "hi": hi})
    lw.bind(node, out)
    lw.count("activation")


ACTIVATION = register_family(
    OpFamily("activation", ACTIVATION_OPS, lower_activation, observed=True, activation=True, bounds=activation_bounds)
)
