"""fuse-requant: fold each requantization (and the clamp after it) into its producer."""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from qpipe.ir.meta import QPARAMS, set_provenance
from qpipe.ir.passes import PassContext, PassResult, register
from qpipe.ir.shapes import propagate_meta
from qpipe.ir.stages import Stage

q = torch.ops.qpipe


def _single_user(node: Node, target) -> Node | None:
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    return user if user.op == "call_function" and user.target is target else None


def _absorb_clamp(node: Node, lo_idx: int, hi_idx: int) -> tuple[Node, int]:
    """If ``node`` is read only by a clamp_int, narrow its own bounds and drop the clamp."""
    clamp = _single_user(node, q.clamp_int.default)
    if clamp is None:
        return node, 0
    args = list(node.args)
    args[lo_idx] = max(args[lo_idx], clamp.args[1])
    args[hi_idx] = min(args[hi_idx], clamp.args[2])
    node.args = tuple(args)
    node.meta.setdefault(QPARAMS, {}).update({"lo": args[lo_idx], "hi": args[hi_idx]})
    clamp.replace_all_uses_with(node)
    set_provenance(node, [node, clamp])
    node.graph.erase_node(clamp)
    return node, 1


@register("fuse-requant", needs=Stage.INTEGER, leaves=Stage.INTEGER)
def fuse_requant(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Fuse dyadic requantization into its producer: conv/linear + requant (+ clamp) -> one op.

    The numbers do not change: the fused kernels run the same integer steps;
    a clamp after a clamp is one clamp with the narrower bounds.
    """
    graph = gm.graph
    stats = {"conv": 0, "linear": 0, "clamp": 0}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (q.conv1d_acc.default, q.linear_acc.default):
            continue
        rq = _single_user(node, q.requant.default)
        if rq is None:
            continue
        _, stats_clamp = _absorb_clamp(rq, 4, 5)
        stats["clamp"] += stats_clamp
        acc_m, acc_s, _cd, lo, hi, bits = rq.args[1:]
        if node.target is q.conv1d_acc.default:
            x, w, b, stride, padding, dilation, groups, _acc_bits = node.args
            args = (x, w, b, acc_m, acc_s, stride, padding, dilation, groups, lo, hi, bits)
            target = q.conv1d_rq.default
            stats["conv"] += 1
        else:
            x, w, b, _acc_bits = node.args
            args = (x, w, b, acc_m, acc_s, lo, hi, bits)
            target = q.linear_rq.default
            stats["linear"] += 1
        base = node.name.removesuffix("_conv1d_acc").removesuffix("_linear_acc")
        with graph.inserting_before(rq):
            fused = graph.create_node("call_function", target, args, name=f"{base}_rq")
        fused.meta[QPARAMS] = {**node.meta.get(QPARAMS, {}), **rq.meta.get(QPARAMS, {})}
        set_provenance(fused, [node, rq])
        rq.replace_all_uses_with(fused)
        graph.erase_node(rq)
        graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in (q.add_requant.default, q.requant.default):
            idx = (5, 6) if node.target is q.add_requant.default else (4, 5)
            _, n = _absorb_clamp(node, *idx)
            stats["clamp"] += n
    graph.lint()
    gm.recompile()
    propagate_meta(gm)
    return PassResult(gm, any(stats.values()), stats)
