"""The lowering table: for each ATen op, the op family that knows how it is
observed and how it becomes ``qpipe::`` integer ops.

``insert-observers``, ``substitute-int-ops`` and the unsupported-op report
dispatch through this table; adding an op family is one :class:`OpFamily` in
one handler module (plus its ``qpipe::`` ops in ``qpipe/ir/ops``), nothing else.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.fx import GraphModule, Node

from qpipe.ir.printer import target_name


@dataclass(frozen=True)
class OpFamily:
    """How one family of float ATen ops is quantized.

    ``observed``: its output gets an activation observer (or the activation that
    alone reads it gets one, and its clamp folds in). ``weight``: the argument
    holding a weight to quantize per output channel. ``activation``: a clamp in
    real units (``bounds``) that may fold into its producer's requantization.
    ``transparent``: passes values through unchanged (views, dropout), looked
    through when finding who reads a value. ``output_only``: allowed only right
    before the graph output (a monotone tail such as log_softmax).
    """

    name: str
    aten_ops: frozenset
    lower: Callable[[Node, Any], None]  # (float node, the run's qpipe.passes.lower.context.Lowering)
    observed: bool = False
    weight: Optional[str] = None
    activation: bool = False
    bounds: Optional[Callable[[Node], tuple[float, float]]] = None
    transparent: bool = False
    output_only: bool = False


_TABLE: dict[Any, OpFamily] = {}
_FAMILIES: dict[str, OpFamily] = {}


def register_family(family: OpFamily) -> OpFamily:
    if family.name in _FAMILIES:
        raise ValueError(f"op family '{family.name}' is registered twice")
    for op in family.aten_ops:
        if op in _TABLE:
            raise ValueError(f"{op} belongs to op families '{_TABLE[op].name}' and '{family.name}'")
    _FAMILIES[family.name] = family
    for op in family.aten_ops:
        _TABLE[op] = family
    return family


def family_of(node: Node) -> Optional[OpFamily]:
    return _TABLE.get(node.target) if node.op == "call_function" else None


def families() -> list[OpFamily]:
    return list(_FAMILIES.values())


def ops_where(predicate: Callable[[OpFamily], bool]) -> frozenset:
    return frozenset(op for op, fam in _TABLE.items() if predicate(fam))


def transparent_ops() -> frozenset:
    return ops_where(lambda f: f.transparent)


def _carries_tensor(val: Any) -> bool:
    if isinstance(val, torch.Tensor):
        return True
    return isinstance(val, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in val)


def unsupported_ops(gm: GraphModule) -> dict[str, int]:
    """Ops fed by the model input that have no op family yet, with counts.

    Shape arithmetic that does not depend on input values (sizes, aranges) is not
    counted: it is not fed by a tensor of the input. A tuple-returning op (``q, k, v
    = x.unbind(...)``) feeds its ``getitem`` users, so what follows it is counted.
    """
    fed: set[Node] = set()
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            fed.add(node)
            continue
        if node.op not in ("call_function", "call_module") or not any(a in fed for a in node.all_input_nodes):
            continue
        if not _carries_tensor(node.meta.get("val")):
            continue
        fed.add(node)
        if node.op == "call_module" or node.target in _TABLE:
            continue
        counts[target_name(node)] += 1
    return dict(sorted(counts.items()))


def is_call(node: Node, ops) -> bool:
    return node.op == "call_function" and node.target in ops
