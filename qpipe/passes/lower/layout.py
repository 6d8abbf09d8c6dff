"""Ops that move values without changing them: views and selections (copied onto
the integer tensor), dropout (gone at inference), and monotone tails before the
output (log_softmax: greedy CTC's argmax is unchanged without it)."""
from __future__ import annotations

import torch
from torch.fx import Node

from qpipe.ir.errors import QpipeError
from qpipe.ir.graph_utils import users_through
from qpipe.ir.meta import source_name
from qpipe.ir.printer import target_name
from qpipe.ir.verifier import LAYOUT_OPS
from qpipe.passes.lower.context import Lowering
from qpipe.passes.lower.table import OpFamily, register_family, transparent_ops

aten = torch.ops.aten
DROPOUT_OPS = frozenset({aten.dropout.default, aten.alpha_dropout.default, aten.feature_dropout.default})
TAIL_OPS = frozenset({aten.log_softmax.int, aten._log_softmax.default})


def lower_layout(node: Node, lw: Lowering) -> None:
    lw.bind(node, lw.copy_layout(node, lw.int_input(node, node.args[0])))
    lw.count("layout")


def lower_passthrough(node: Node, lw: Lowering) -> None:
    lw.bind(node, lw.int_input(node, node.args[0]))


def lower_tail(node: Node, lw: Lowering) -> None:
    users = users_through(node, transparent_ops())
    if any(u.op != "output" for u in users):
        raise QpipeError(f"{source_name(node)}: {target_name(node)} is supported only at the graph output")
    lw.tail_ops.append(f"{target_name(node)}(dim={node.args[1] if len(node.args) > 1 else -1})")
    lower_passthrough(node, lw)


LAYOUT = register_family(OpFamily("layout", LAYOUT_OPS, lower_layout, transparent=True))
DROPOUT = register_family(OpFamily("dropout", DROPOUT_OPS, lower_passthrough, transparent=True))
TAIL = register_family(OpFamily("tail", TAIL_OPS, lower_tail, output_only=True))
