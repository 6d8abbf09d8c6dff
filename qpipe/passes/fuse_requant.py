"""fuse-requant: fold each requantization (and the clamp after it) into its producer."""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from qpipe.ir.meta import QPARAMS, set_provenance
from qpipe.ir.opspec import OpKind, spec_by_name, spec_of
from qpipe.ir.passes import PassContext, PassResult, register
from qpipe.ir.qtype import QTYPE
from qpipe.ir.stages import Stage

q = torch.ops.qpipe


def _single_user(node: Node, target) -> Node | None:
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    return user if user.op == "call_function" and user.target is target else None


def _absorb_clamp(node: Node) -> int:
    """If ``node`` (an op with a clamp) is read only by a clamp_int, narrow its bounds and drop the clamp."""
    clamp = _single_user(node, q.clamp_int.default)
    spec = spec_of(node)
    if clamp is None or spec is None or spec.clamp is None:
        return 0
    lo_name, hi_name = spec.clamp
    values = spec.bind(node)
    bounds = spec_of(clamp).bind(clamp)
    values[lo_name] = max(values[lo_name], bounds["lo"])
    values[hi_name] = min(values[hi_name], bounds["hi"])
    node.args, node.kwargs = spec.args_from(values), {}
    node.meta.setdefault(QPARAMS, {}).update({"lo": values[lo_name], "hi": values[hi_name]})
    clamp.replace_all_uses_with(node)
    set_provenance(node, [node, clamp])
    node.graph.erase_node(clamp)
    return 1


@register("fuse-requant", needs=Stage.INTEGER, leaves=Stage.INTEGER)
def fuse_requant(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Fuse dyadic requantization into its producer: conv/linear + requant (+ clamp) -> one op.

    The numbers do not change: the fused kernels run the same integer steps;
    a clamp after a clamp is one clamp with the narrower bounds. Which accumulator
    fuses into which op is the accumulator's spec (``OpSpec.fused``); arguments
    move by name.
    """
    graph = gm.graph
    stats: dict[str, int] = {"clamp": 0}
    for node in list(graph.nodes):
        spec = spec_of(node)
        if spec is None or spec.kind is not OpKind.ACCUMULATE or spec.fused is None:
            continue
        rq = _single_user(node, q.requant.default)
        if rq is None:
            continue
        stats["clamp"] += _absorb_clamp(rq)
        fused_spec = spec_by_name(spec.fused)
        values = {**spec.bind(node), **spec_of(rq).bind(rq)}
        base = node.name.removesuffix(f"_{spec.name}")
        with graph.inserting_before(rq):
            fused = graph.create_node("call_function", fused_spec.op, fused_spec.args_from(values), name=f"{base}_rq")
        fused.meta[QPARAMS] = {**node.meta.get(QPARAMS, {}), **rq.meta.get(QPARAMS, {})}
        fused.meta[QTYPE] = rq.meta[QTYPE]
        set_provenance(fused, [node, rq])
        rq.replace_all_uses_with(fused)
        graph.erase_node(rq)
        graph.erase_node(node)
        key = spec.name.removesuffix("_acc")
        stats[key] = stats.get(key, 0) + 1
    for node in list(graph.nodes):
        spec = spec_of(node)
        if spec is not None and spec.kind is OpKind.REQUANTIZE and spec.clamp is not None:
            stats["clamp"] += _absorb_clamp(node)
    return PassResult(gm, any(stats.values()), stats)
