"""Inline ``torch.export``'s ``wrap_with_autocast`` regions back into the graph.

Non-strict export captures a ``with torch.amp.autocast(..., enabled=False):`` block
(NeMo's squeeze-excite computes in float32 inside one) as a higher-order op that
calls a submodule. The op families and passes work on plain ATen nodes, so each
region whose autocast is *disabled* is inlined: in a float32 model a disabled
autocast changes no dtype, so the inlined nodes compute the same values (their
``meta["val"]`` is copied from the region's own). An enabled region is left alone
(its casts would matter) and shows up in the unsupported-op report.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

_AUTOCAST = getattr(torch.ops.higher_order, "wrap_with_autocast", None)


def inline_disabled_autocast(gm: GraphModule) -> int:
    """Inline every disabled ``wrap_with_autocast`` region of ``gm``; returns how many were inlined."""
    if _AUTOCAST is None:
        return 0
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _AUTOCAST or bool(node.args[2]):
            continue
        sub_node, operands = node.args[4], node.args[5:]
        body: GraphModule = getattr(gm, sub_node.target)
        env: dict[Node, object] = {}
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        env.update(zip(placeholders, operands))
        results = None
        with gm.graph.inserting_before(node):
            for inner in body.graph.nodes:
                if inner.op == "placeholder":
                    continue
                if inner.op == "output":
                    results = torch.fx.node.map_arg(inner.args[0], lambda a: env[a])
                    continue
                if inner.op == "get_attr":
                    name = f"{sub_node.target}_{inner.target}".replace(".", "_")
                    setattr(gm, name, getattr(body, inner.target))
                    new = gm.graph.get_attr(name)
                    new.meta = dict(inner.meta)
                    env[inner] = new
                    continue
                env[inner] = gm.graph.node_copy(inner, lambda a: env[a])
        results = results if isinstance(results, (list, tuple)) else (results,)
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(results[user.args[1]])
                gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        if not sub_node.users:
            gm.graph.erase_node(sub_node)
            delattr(gm, sub_node.target)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
