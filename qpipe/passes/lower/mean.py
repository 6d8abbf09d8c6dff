"""Means over time: ``aten.mean.dim`` and NeMo's masked squeeze-excite pool,
``sum(masked_fill(x, ~mask, 0), -1, keepdim) / mask.sum(-1, keepdim).to(float)``.

Both become ``qpipe.mean_int`` (exact int64 sum, integer division by the count,
one dyadic requantization to the observed output scale, half up).

* ``mean``: divides by the size of the reduced dimensions.
* ``sum`` is lowered only as the numerator of a mean (a ``div`` reads it alone);
  the ``div`` does the work. Its divisor is the count of valid frames, an integer
  tensor the graph computes from the lengths (outside the integer region); the
  float cast NeMo puts on it is looked through, so the kernel divides by the
  int64 count itself and the cast is left dead.
* ``div`` by anything else (a constant: ``scores / sqrt(d_k)``) goes to the
  constant-operand handler of :mod:`qpipe.passes.lower.nonlinear`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Node

from qpipe.ir.errors import QpipeError
from qpipe.ir.meta import source_name
from qpipe.ir.ops.mean import MAX_MEAN_SHIFT
from qpipe.passes.lower.context import Lowering
from qpipe.passes.lower.nonlinear import emit_requantized, lower_constant_operand, per_tensor
from qpipe.passes.lower.table import OpFamily, register_family

aten = torch.ops.aten
q = torch.ops.qpipe
SUM_OPS = frozenset({aten.sum.dim_IntList})
CAST_OPS = frozenset({aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout})
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _dims(arg) -> list[int]:
    return [int(d) for d in arg] if isinstance(arg, (list, tuple)) else ([int(arg)] if arg is not None else [])


def _integer_count(lw: Lowering, divisor) -> Optional[Node]:
    """The int64 count a mean divides by: ``divisor`` or the integer tensor it is a float cast of."""
    if not isinstance(divisor, Node) or divisor in lw.int_of:
        return None
    node = divisor
    while node.op == "call_function" and node.target in CAST_OPS:
        node = node.args[0]
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dtype in INT_DTYPES:
        return node
    return None


def _emit_mean(lw: Lowering, node: Node, src: Node, count: Optional[Node], dims: list[int], keepdim: bool) -> None:
    xi = lw.int_input(node, src)
    qx = per_tensor(lw, node, xi)
    values = {"x": xi, "count": count, "dim": dims, "keepdim": keepdim}
    emit_requantized(lw, node, q.mean_int.default, values, (float(qx.scale),), qx.bits + qx.unsigned + 16, max_shift=MAX_MEAN_SHIFT)
    lw.count("mean")


def lower_mean(node: Node, lw: Lowering) -> None:
    dims = _dims(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
    keepdim = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    _emit_mean(lw, node, node.args[0], None, dims, keepdim)


def _mean_numerator(node: Node) -> bool:
    users = list(node.users)
    return len(users) == 1 and users[0].target is aten.div.Tensor and users[0].args[0] is node


def lower_sum(node: Node, lw: Lowering) -> None:
    if not _mean_numerator(node):
        raise QpipeError(f"{source_name(node)}: a sum is lowered only as the numerator of a mean (sum / count)")
    # The div that alone reads it emits the mean (and rebinds the sum to it); until then the sum stands for its
    # integer input, so that the div is seen as fed by the integer region.
    lw.bind(node, lw.int_input(node, node.args[0]))


def lower_div(node: Node, lw: Lowering) -> None:
    num, den = node.args[0], node.args[1]
    if isinstance(num, Node) and num.op == "call_function" and num.target in SUM_OPS and (count := _integer_count(lw, den)) is not None:
        dims = _dims(num.args[1] if len(num.args) > 1 else num.kwargs.get("dim"))
        keepdim = bool(num.args[2] if len(num.args) > 2 else num.kwargs.get("keepdim", False))
        _emit_mean(lw, node, num.args[0], count, dims, keepdim)
        lw.bind(num, lw.int_of[node])
        return
    lower_constant_operand(node, lw)


def lower_cast(node: Node, lw: Lowering) -> None:
    """A float cast that keeps a float32 value float32 (NeMo's ``x.float()``) moves nothing."""
    src = node.args[0]
    src_val, val = src.meta.get("val"), node.meta.get("val")
    if not (isinstance(src_val, torch.Tensor) and isinstance(val, torch.Tensor) and src_val.dtype == val.dtype):
        raise QpipeError(f"{source_name(node)}: a cast that changes the dtype inside the model is not supported")
    lw.bind(node, lw.int_input(node, src))


MEAN = register_family(OpFamily("mean", frozenset({aten.mean.dim}), lower_mean, observed=True))
SUM = register_family(OpFamily("sum", SUM_OPS, lower_sum))
DIV = register_family(OpFamily("div", frozenset({aten.div.Tensor}), lower_div, observed=True))
CAST = register_family(OpFamily("cast", CAST_OPS, lower_cast, transparent=True))
