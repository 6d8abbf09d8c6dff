"""Node metadata that passes share: quantization policy, qparams and provenance.

Policy is data: ``insert-observers`` writes ``meta["qpolicy"]`` and later passes
read it, so a user pass can change a layer's bits without touching mechanics.
"""
from __future__ import annotations

from typing import Any, Iterable

from torch.fx import Node

QPOLICY = "qpolicy"  # what to do: {"bits": 8, "method": "percentile", "percentile": 99.99, ...}
QPARAMS = "qparams"  # what was decided: scales, dyadic (m, s), saturation, ...
PROVENANCE = "qpipe_from"  # list of source names this node came from
BN_TARGET = "bn_target"  # folded conv: {"mean": Tensor, "std": Tensor} that real data would give


def source_name(node: Node) -> str:
    """A human name for where a node came from: its module path when known."""
    prov = node.meta.get(PROVENANCE)
    if prov:
        return prov[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        path = path.replace("L['self'].", "").replace("L__self___", "")
        return f"{path}:{node.name}"
    if node.op == "get_attr":
        return str(node.target)
    return node.name


def set_provenance(new: Node, sources: Iterable[Node]) -> None:
    """Record the original nodes ``new`` came from (transitively, first-seen order)."""
    names: list[str] = []
    for src in sources:
        for name in src.meta.get(PROVENANCE) or [source_name(src)]:
            if name not in names:
                names.append(name)
    new.meta[PROVENANCE] = names
    for src in sources:  # keep the module stack so later passes can still name it
        if "nn_module_stack" in src.meta and "nn_module_stack" not in new.meta:
            new.meta["nn_module_stack"] = src.meta["nn_module_stack"]


def qparams(node: Node) -> dict[str, Any]:
    return node.meta.setdefault(QPARAMS, {})


def qpolicy(node: Node) -> dict[str, Any]:
    return node.meta.setdefault(QPOLICY, {})
