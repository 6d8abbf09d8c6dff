"""Linear layers: the same integer recipe as convolutions, channels on the last axis."""
from __future__ import annotations

import torch
from torch.fx import Node

from qpipe.passes.lower.conv import lower_weighted
from qpipe.passes.lower.context import Lowering
from qpipe.passes.lower.table import OpFamily, register_family

LINEAR_OPS = frozenset({torch.ops.aten.linear.default})


def lower_linear(node: Node, lw: Lowering) -> None:
    x, w_node = node.args[0], node.args[1]
    b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    channel_dim = node.meta["val"].dim() - 1
    lower_weighted(lw, node, x, w_node, b_node, torch.ops.qpipe.linear_acc.default, {}, channel_dim)
    lw.count("linear")


LINEAR = register_family(OpFamily("linear", LINEAR_OPS, lower_linear, observed=True, weight="weight"))
