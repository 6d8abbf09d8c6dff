"""Small graph edits every pass needs: constants, dead-node pruning, attribute cleanup."""
from __future__ import annotations

import re
from typing import Any

import torch
from torch.fx import GraphModule, Node


def fetch_attr(gm: GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def add_constant(gm: GraphModule, hint: str, value: torch.Tensor, before: Node) -> Node:
    """Register ``value`` as a buffer of ``gm`` and return a ``get_attr`` node for it."""
    base = re.sub(r"\W", "_", hint).strip("_") or "const"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, value.detach().clone().contiguous(), persistent=True)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    return node


def prune_to_outputs(gm: GraphModule) -> int:
    """Erase every node the outputs do not depend on; returns how many.

    fx's own dead-code elimination keeps nodes that look impure (in-place
    ``detach_``, metadata asserts, observers); a value nobody reads is dead here.
    """
    live: set[Node] = set()
    stack = [n for n in gm.graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node in live:
            continue
        live.add(node)
        stack.extend(node.all_input_nodes)
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if node not in live and node.op != "placeholder":
            gm.graph.erase_node(node)
            removed += 1
    return removed


def delete_unused_attributes(gm: GraphModule) -> tuple[int, int]:
    """Drop parameters, buffers and submodules no node refers to; returns (count, bytes)."""
    used_attrs = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    used_modules = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    count = nbytes = 0
    for name, tensor in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used_attrs:
            owner_path, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            delattr(owner, leaf)
            count += 1
            nbytes += tensor.numel() * tensor.element_size()
    for name, _ in list(gm.named_children()):
        if name not in used_modules and not any(a.startswith(name + ".") for a in used_attrs | used_modules):
            delattr(gm, name)
    gm.delete_all_unused_submodules()
    return count, nbytes


def users_through(node: Node, transparent: set) -> list[Node]:
    """Users of ``node``, looking through ops in ``transparent`` (e.g. dropout, views)."""
    out: list[Node] = []
    for user in node.users:
        if user.op == "call_function" and user.target in transparent:
            out.extend(users_through(user, transparent))
        else:
            out.append(user)
    return out
