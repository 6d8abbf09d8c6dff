"""What each stage allows, as tables, and the check that a graph keeps to them.

The integer stage is the contract that matters: every node between an input
``qpipe.quantize`` and the graph output is an integer tensor made by an op in
``INTEGER_OPS``; each offender is named with its provenance.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from qpipe.ir.errors import QpipeError
from qpipe.ir.graph_utils import fetch_attr
from qpipe.ir.meta import QPARAMS, source_name
from qpipe.ir.printer import target_name
from qpipe.ir.stages import Stage

aten = torch.ops.aten
qpipe_ops = torch.ops.qpipe

# Ops that move or select integers without changing any value or scale.
LAYOUT_OPS = frozenset(
    {
        aten.transpose.int,
        aten.permute.default,
        aten.view.default,
        aten.reshape.default,
        aten._unsafe_view.default,
        aten.contiguous.default,
        aten.clone.default,
        aten.unsqueeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.slice.Tensor,
        aten.select.int,
        aten.expand.default,
        aten.flatten.using_ints,
        aten.cat.default,
        aten.alias.default,
        aten.t.default,
        operator.getitem,
    }
)

INTEGER_OPS = frozenset(
    {
        qpipe_ops.conv1d_acc.default,
        qpipe_ops.linear_acc.default,
        qpipe_ops.requant.default,
        qpipe_ops.add_requant.default,
        qpipe_ops.clamp_int.default,
        qpipe_ops.conv1d_rq.default,
        qpipe_ops.linear_rq.default,
    }
)
BATCH_NORM_OPS = frozenset(
    {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default, aten.native_batch_norm.default}
)
INTEGER_DTYPES = frozenset({torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8})


def _is_observer(node: Node, gm: GraphModule) -> bool:
    return node.op == "call_module" and getattr(gm.get_submodule(node.target), "qpipe_observer", False)


def _vals(node: Node) -> list:
    val = node.meta.get("val")
    return list(val) if isinstance(val, (list, tuple)) else [val]


def integer_region(gm: GraphModule) -> list[Node]:
    """Nodes downstream of an input quantizer (the quantizers excluded), in graph order."""
    region: set[Node] = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is qpipe_ops.quantize.default:
            region.add(node)
        elif any(isinstance(a, Node) and a in region for a in node.all_input_nodes):
            region.add(node)
    return [
        n for n in gm.graph.nodes if n in region and n.op != "output" and n.target is not qpipe_ops.quantize.default
    ]


def integer_violations(gm: GraphModule) -> list[str]:
    problems = []
    for node in integer_region(gm):
        where = f"%{node.name} = {target_name(node)} (from {source_name(node)})"
        if node.op == "call_function" and node.target not in INTEGER_OPS and node.target not in LAYOUT_OPS:
            problems.append(f"{where}: not an integer op")
            continue
        if node.op != "call_function":
            problems.append(f"{where}: {node.op} inside the integer region")
            continue
        for val in _vals(node):
            if isinstance(val, torch.Tensor) and val.dtype not in INTEGER_DTYPES:
                problems.append(f"{where}: produces {val.dtype}")
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                const = fetch_attr(gm, arg.target)
                if isinstance(const, torch.Tensor) and const.dtype not in INTEGER_DTYPES:
                    problems.append(f"{where}: reads float constant {arg.target}")
    return problems


def verify(gm: GraphModule, stage: Stage) -> None:
    """Raise QpipeError listing every node that breaks the contract of ``stage``."""
    problems: list[str] = []
    nodes = list(gm.graph.nodes)
    for node in nodes:
        if node.op == "call_function" and "val" not in node.meta:
            problems.append(f"%{node.name} = {target_name(node)}: no meta['val'] (shape/dtype unknown)")
    if stage >= Stage.FOLDED:
        for node in nodes:
            if node.op == "call_function" and node.target in BATCH_NORM_OPS:
                problems.append(f"%{node.name} ({source_name(node)}): BatchNorm left unfolded")
    if stage in (Stage.OBSERVED, Stage.CALIBRATED):
        observers = [n for n in nodes if _is_observer(n, gm)]
        if not observers:
            problems.append("no activation observers in the graph")
        if stage == Stage.CALIBRATED:
            for node in observers:
                scale = node.meta.get(QPARAMS, {}).get("scale")
                if scale is None or not (scale > 0 and scale < float("inf")):
                    problems.append(f"%{node.name} ({source_name(node)}): observer has no valid scale ({scale})")
    if stage == Stage.INTEGER:
        if not any(n.op == "call_function" and n.target is qpipe_ops.quantize.default for n in nodes):
            problems.append("no input quantizer (qpipe.quantize) in the integer graph")
        problems += [f"%{n.name} ({source_name(n)}): observer left in the integer graph" for n in nodes if _is_observer(n, gm)]
        problems += integer_violations(gm)
    if problems:
        listing = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise QpipeError(f"{stage} stage verifier: {len(problems)} problem(s):\n  {listing}{more}")
