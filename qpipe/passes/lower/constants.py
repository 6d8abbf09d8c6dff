"""Float constants read by the integer region become quantized integer constants.

A Conformer's relative-position attention reads constants beside activations:
``pos_bias_u``/``pos_bias_v`` added to the queries, and the positional encodings
through ``linear_pos`` (a slice of the ``pe`` buffer whose bounds follow the
input's length). Before observers go in, :func:`fold_constant_linears` computes
``linear(pe)`` once, so what the integer region reads is a slice of a constant;
during lowering, :func:`quantize_constant_chain` quantizes such a constant (per
tensor, symmetric, its own max) and replays the views/slices on the integers.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from qpipe.ir.dyadic import int_range
from qpipe.ir.graph_utils import add_constant, fetch_attr
from qpipe.ir.meta import set_provenance
from qpipe.ir.ops.kernels import div_round_half_up, dtype_for_bits
from qpipe.ir.qtype import QType
from qpipe.ir.verifier import LAYOUT_OPS

aten = torch.ops.aten
CONSTANT_BITS = 8
_SLICES = frozenset({aten.slice.Tensor, aten.select.int})
_CHAIN_OPS = LAYOUT_OPS - {aten.cat.default}


def _float_const(gm: GraphModule, node: Any) -> Optional[torch.Tensor]:
    if isinstance(node, Node) and node.op == "get_attr":
        value = fetch_attr(gm, node.target)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    return None


def _tensor_args(node: Node) -> list[Node]:
    return [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor) or a.op == "get_attr"]


def constant_chain(gm: GraphModule, arg: Any) -> Optional[tuple[Node, list[Node]]]:
    """``(get_attr, [layout ops from it to arg])`` when ``arg`` is a float constant seen through views only."""
    chain: list[Node] = []
    node = arg
    while isinstance(node, Node) and node.op == "call_function" and node.target in _CHAIN_OPS:
        if len(_tensor_args(node)) != 1:
            return None
        chain.append(node)
        node = node.args[0]
    if _float_const(gm, node) is None:
        return None
    return node, chain[::-1]


def quantize_constant_chain(lw, node: Node, arg: Any) -> Optional[Node]:
    """The integer stand-in of a float constant (through views) read by ``node``; None if ``arg`` is no such thing."""
    found = constant_chain(lw.gm, arg)
    if found is None:
        return None
    const, chain = found
    if const not in lw.int_of:
        value = fetch_attr(lw.gm, const.target).detach().to(torch.float64)
        _, hi = int_range(CONSTANT_BITS)
        amax = float(value.abs().max()) if value.numel() else 0.0
        scale = amax / hi if amax > 0 else 1.0
        q = div_round_half_up(value, scale).clamp(-hi, hi).to(dtype_for_bits(CONSTANT_BITS))
        first_user = chain[0] if chain else node
        qnode = lw.const(f"{const.target}_q", q, first_user, QType.of(CONSTANT_BITS, scale))
        qnode.meta["val"] = q
        set_provenance(qnode, [const])
        lw.bind(const, qnode)
        lw.count("constant")
    current = lw.int_of[const]
    for layout in chain:
        if layout not in lw.int_of:
            lw.bind(layout, lw.copy_layout(layout, current))
        current = lw.int_of[layout]
    return current


def fold_constant_linears(gm: GraphModule) -> int:
    """``linear(slice(C), W, b)`` of a float constant ``C`` -> ``slice(linear(C, W, b))``, computed once.

    Slices and selects on any axis but the last commute with a linear over the
    last axis; the result is a float constant the integer region reads as one
    quantized constant (NeMo's ``linear_pos`` over the positional encodings).
    """
    folded = 0
    for lin in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.linear.default]:
        w = _float_const(gm, lin.args[1])
        b_node = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        b = _float_const(gm, b_node) if b_node is not None else None
        found = constant_chain(gm, lin.args[0])
        if w is None or found is None or (b_node is not None and b is None):
            continue
        const, chain = found
        if any(n.target not in _SLICES for n in chain):
            continue
        c = fetch_attr(gm, const.target)
        if any((int(n.args[1]) % c.dim()) == c.dim() - 1 for n in chain if len(n.args) > 1 and n.target is aten.slice.Tensor) \
                or any(n.target is aten.select.int for n in chain):
            continue  # a slice of the last axis does not commute with the linear (selects change the rank)
        with torch.no_grad():
            value = torch.nn.functional.linear(c.to(torch.float64), w.to(torch.float64),
                                               None if b is None else b.to(torch.float64)).to(c.dtype)
        first = chain[0] if chain else lin
        new = add_constant(gm, f"{lin.name}_folded_const", value, first)
        new.meta["val"] = value
        set_provenance(new, [lin, const])
        current = new
        for s in chain:
            with gm.graph.inserting_before(lin):
                current = gm.graph.create_node("call_function", s.target, (current, *s.args[1:]), dict(s.kwargs),
                                               name=f"{s.name}_of_{lin.name}")
            set_provenance(current, [s, lin])
        lin.replace_all_uses_with(current)
        gm.graph.erase_node(lin)
        folded += 1
    return folded
