"""Masking and padding in integers: the fill value's integer image at the input's scale.

``aten.masked_fill(x, mask, v)`` -> ``qpipe.masked_fill_int(x, mask, round(v / S_x))``
clamped to the input's range: 0.0 stays 0, and ``-10000`` becomes the integer
minimum. Attention's ``softmax(masked_fill(scores, mask, -10000))`` does not read
that value: the softmax handler (:mod:`qpipe.passes.lower.softmax`) takes the
scores and the mask into one ``qpipe.masked_softmax_int`` (masked entries exactly
0), and this ``masked_fill_int`` is left dead. ``aten.pad`` (constant mode) ->
``qpipe.pad_int`` with the same rule.
Neither is observed: the scale is the input's.
"""
from __future__ import annotations

import math

import torch
from torch.fx import Node

from qpipe.ir.dyadic import int_range
from qpipe.ir.errors import QpipeError
from qpipe.ir.meta import source_name
from qpipe.passes.lower.context import Lowering
from qpipe.passes.lower.table import OpFamily, register_family

aten = torch.ops.aten
MASK_OPS = frozenset({aten.masked_fill.Scalar})
PAD_OPS = frozenset({aten.pad.default, aten.constant_pad_nd.default})


def fill_value(value: float, scale: float, bits: int, unsigned: bool = False) -> int:
    """``round_half_up(value / scale)`` clamped to the symmetric range of ``bits`` (``[0, 2**bits - 1]``
    for an unsigned tensor, whose storage cannot hold a negative fill)."""
    lo, hi = (0, (1 << bits) - 1) if unsigned else int_range(bits)
    if not math.isfinite(value):
        return lo if value < 0 else hi
    return max(lo, min(hi, math.floor(value / scale + 0.5)))


def lower_masked_fill(node: Node, lw: Lowering) -> None:
    x, mask, value = node.args[0], node.args[1], node.args[2]
    if isinstance(mask, Node) and mask in lw.int_of:
        raise QpipeError(f"{source_name(node)}: masked_fill with a mask computed from the model's values")
    xi = lw.int_input(node, x)
    q = lw.qtype(xi)
    v = fill_value(float(value), float(q.scale), q.bits, q.unsigned)
    out = lw.emit(lw.anchor(node), torch.ops.qpipe.masked_fill_int.default, {"x": xi, "mask": mask, "value": v},
                  node, q, {"value": v})
    lw.bind(node, out)
    lw.count("masked_fill")


def lower_pad(node: Node, lw: Lowering) -> None:
    x, pad = node.args[0], node.args[1]
    if node.target is aten.pad.default:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
    else:
        mode, value = "constant", node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
    if mode != "constant":
        raise QpipeError(f"{source_name(node)}: pad mode '{mode}' is not supported (only constant)")
    xi = lw.int_input(node, x)
    q = lw.qtype(xi)
    v = fill_value(float(value or 0.0), float(q.scale), q.bits, q.unsigned)
    out = lw.emit(lw.anchor(node), torch.ops.qpipe.pad_int.default, {"x": xi, "pad": list(pad), "value": v},
                  node, q, {"value": v})
    lw.bind(node, out)
    lw.count("pad")


MASK = register_family(OpFamily("masked_fill", MASK_OPS, lower_masked_fill))
PAD = register_family(OpFamily("pad", PAD_OPS, lower_pad))
