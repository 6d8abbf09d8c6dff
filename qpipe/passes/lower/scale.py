"""Multiplication and division by constants, and by 0/1 masks.

* Before observers go in, :func:`fold_scalar_products` folds ``x * c`` / ``x / c``
  into the linear or convolution that makes ``x`` (through dropout): ``W*c``,
  ``b*c``. The Conformer's xscaling (``sqrt(d_model)``) and the feed-forward
  modules' ``0.5`` residual factor disappear this way, with no rounding at all.
* A product with a number that cannot be folded (``scores / sqrt(d_k)`` after an
  add) becomes one ``qpipe.scale_rq``: ``w = sign(c)`` at scale ``|c|``, so the
  dyadic pair takes ``S_x * |c|`` to the observed output scale.
* A product with a float 0/1 mask that the graph makes from a boolean (NeMo's
  subsampling masks the padded frames so) becomes ``qpipe.masked_fill_int`` with
  the negated boolean and 0: zero is zero at every scale. The boolean and its
  views are replayed outside the integer region; the float mask is left dead.

The ``mul``/``div`` op families (:mod:`qpipe.passes.lower.gates`, ``mean``) call
these through the constant-operand hook of :mod:`qpipe.passes.lower.nonlinear`.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from qpipe.ir.dyadic import dyadic_bounded
from qpipe.ir.graph_utils import add_constant, fetch_attr
from qpipe.ir.meta import set_provenance
from qpipe.ir.qtype import QType
from qpipe.ir.verifier import LAYOUT_OPS
from qpipe.passes.lower.context import Lowering
from qpipe.passes.lower.nonlinear import register_constant_operand
from qpipe.passes.lower.table import transparent_ops

aten = torch.ops.aten
PRODUCT_OPS = frozenset({aten.mul.Tensor, aten.div.Tensor})
_WEIGHTED = frozenset({aten.linear.default, aten.conv1d.default, aten.conv2d.default})
_CASTS = frozenset({aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout})


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def scalar_operand(node: Node) -> Optional[tuple[Any, float]]:
    """``(x, factor)`` of ``x * c``, ``c * x`` or ``x / c`` with a Python number ``c``; else None."""
    if node.op != "call_function" or node.target not in PRODUCT_OPS or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if node.target is aten.div.Tensor:
        return (a, 1.0 / float(b)) if _number(b) and float(b) != 0.0 else None
    if _number(b):
        return a, float(b)
    if _number(a):
        return b, float(a)
    return None


def _weighted_producer(x: Any) -> Optional[Node]:
    """The linear/conv whose value alone reaches ``x`` through transparent ops (dropout), if any."""
    through = transparent_ops()
    node = x
    while isinstance(node, Node) and node.op == "call_function" and node.target in through:
        if len(node.users) != 1:
            return None
        node = node.args[0]
    if not (isinstance(node, Node) and node.op == "call_function" and node.target in _WEIGHTED and len(node.users) == 1):
        return None
    return node


def fold_scalar_products(gm: GraphModule) -> int:
    """Fold ``x * c`` / ``x / c`` into the weights of the linear or conv making ``x``; returns how many."""
    folded = 0
    for node in list(gm.graph.nodes):
        found = scalar_operand(node)
        if found is None:
            continue
        x, factor = found
        producer = _weighted_producer(x)
        if producer is None or not isinstance(producer.args[1], Node) or producer.args[1].op != "get_attr":
            continue
        b_node = producer.args[2] if len(producer.args) > 2 else producer.kwargs.get("bias")
        if b_node is not None and (not isinstance(b_node, Node) or b_node.op != "get_attr"):
            continue
        args = list(producer.args)
        w = fetch_attr(gm, producer.args[1].target).detach()
        args[1] = add_constant(gm, f"{producer.args[1].target}_scaled", (w.double() * factor).to(w.dtype), producer)
        if b_node is not None:
            b = fetch_attr(gm, b_node.target).detach()
            scaled = add_constant(gm, f"{b_node.target}_scaled", (b.double() * factor).to(b.dtype), producer)
            if len(args) > 2:
                args[2] = scaled
            else:
                producer.kwargs = {**producer.kwargs, "bias": scaled}
        producer.args = tuple(args)
        set_provenance(producer, [producer, node])
        node.replace_all_uses_with(x)
        gm.graph.erase_node(node)
        folded += 1
    return folded


def _lower_scalar(node: Node, lw: Lowering, x: Node, factor: float) -> None:
    xi = lw.int_input(node, x)
    qx = lw.qtype(xi)
    out_scale, bits, act, facts = lw.out_qparams(node)
    lo, hi = lw.int_bounds(bits, out_scale, act, facts.get("unsigned", False))
    before = lw.anchor(node)
    sign = 0 if factor == 0 else (1 if factor > 0 else -1)
    w_scale = abs(factor) if sign else out_scale / float(qx.scale)
    m, s = dyadic_bounded(float(qx.scale) * w_scale / out_scale, qx.max_abs)  # |x * sign| <= max|x|
    values = {
        "x": xi,
        "w": lw.const(f"{node.name}_sign", torch.tensor([sign], dtype=torch.int8), before, QType.of(8, w_scale)),
        "bias": None,
        "m": lw.const(f"{node.name}_m", torch.tensor([m], dtype=torch.int64), before),
        "s": lw.const(f"{node.name}_s", torch.tensor([s], dtype=torch.int64), before),
        "channel_dim": node.meta["val"].dim() - 1, "lo": lo, "hi": hi, "bits": bits,
    }
    qp = {"out_scale": out_scale, "bits": bits, "lo": lo, "hi": hi, "factor": factor, "m": m, "s": s, **facts}
    out = lw.emit(before, torch.ops.qpipe.scale_rq.default, values, node, QType.of(bits, out_scale), qp)
    lw.bind(node, out)
    if act is not None:
        lw.bind(act, out)
        lw.count("activation")
    lw.count("scale")


def _bool_mask(arg: Any) -> Optional[tuple[Node, list[Node]]]:
    """``(boolean source, [views after the float cast])`` when ``arg`` is a 0/1 float mask made from a boolean."""
    views: list[Node] = []
    node = arg
    while isinstance(node, Node) and node.op == "call_function" and node.target in LAYOUT_OPS:
        views.append(node)
        node = node.args[0]
    if not (isinstance(node, Node) and node.op == "call_function" and node.target in _CASTS):
        return None
    src = node.args[0]
    val = src.meta.get("val") if isinstance(src, Node) else None
    if not (isinstance(val, torch.Tensor) and val.dtype == torch.bool):
        return None
    return src, views[::-1]


def _lower_mask_product(node: Node, lw: Lowering, x: Node, mask: Node) -> bool:
    found = _bool_mask(mask)
    if found is None:
        return False
    src, views = found
    graph = lw.graph
    with graph.inserting_before(node):
        dropped = graph.call_function(aten.logical_not.default, (src,))
        set_provenance(dropped, [mask])
        for v in views:
            dropped = graph.create_node("call_function", v.target, (dropped, *v.args[1:]), dict(v.kwargs))
            set_provenance(dropped, [v])
    xi = lw.int_input(node, x)
    out = lw.emit(lw.anchor(node), torch.ops.qpipe.masked_fill_int.default, {"x": xi, "mask": dropped, "value": 0},
                  node, lw.qtype(xi), {"value": 0, "mask": "0/1 float mask from a boolean"})
    lw.bind(node, out)
    lw.count("mask")
    return True


def lower_constant_product(node: Node, lw: Lowering) -> bool:
    """The constant-operand hook: a number (folded into scales) or a 0/1 mask; False for anything else."""
    found = scalar_operand(node)
    if found is not None:
        _lower_scalar(node, lw, found[0], found[1])
        return True
    if node.target is aten.mul.Tensor:
        a, b = node.args[0], node.args[1]
        for x, other in ((a, b), (b, a)):
            if isinstance(x, Node) and x in lw.int_of and isinstance(other, Node) and other not in lw.int_of:
                return _lower_mask_product(node, lw, x, other)
    return False


register_constant_operand(aten.mul.Tensor, lower_constant_product)
register_constant_operand(aten.div.Tensor, lower_constant_product)
