"""Shape reads (``aten.sym_size``): they read the float input's size, not its values,
so they stay as they are (outside the integer region, which holds tensors only)."""
from __future__ import annotations

import torch
from torch.fx import Node

from qpipe.passes.lower.context import Lowering
from qpipe.passes.lower.table import OpFamily, register_family

SHAPE_OPS = frozenset({torch.ops.aten.sym_size.int})


def lower_shape(node: Node, lw: Lowering) -> None:
    """Nothing to do: a size is an integer already and does not depend on the quantized values."""


SHAPE = register_family(OpFamily("shape", SHAPE_OPS, lower_shape))
