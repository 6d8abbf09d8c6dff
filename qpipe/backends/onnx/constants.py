"""Integer constants that the graph reads as activations (rel-pos attention's
``pos_bias_u`` / ``pos_bias_v``, an ``add_requant`` operand) as codes in ONNX.

The builder keeps every ``get_attr`` as a constant for the op that reads it as a
weight (``("attr", node)`` in its environment); an op that reads one as an
*input* (``OpSpec.inputs``), as ``add_requant`` does with a quantized bias, needs
codes there. :func:`lifted` wraps each such read in ``aten.lift_fresh_copy`` (a
copy of a constant: the same numbers) for the duration of an export, and the
ATen lowering of that op here writes the constant's codes in the layout's type
(:func:`qpipe.backends.onnx.shapes.operand`); the graph is restored afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch.fx import GraphModule, Node

from qpipe.backends.onnx.registry import aten_lowering
from qpipe.backends.onnx.shapes import operand
from qpipe.ir.opspec import spec_of
from qpipe.ir.qtype import qtype_of

aten = torch.ops.aten


def _integer_constant(arg) -> bool:
    if not (isinstance(arg, Node) and arg.op == "get_attr" and qtype_of(arg) is not None):
        return False
    val = arg.meta.get("val")
    return val is None or not val.is_floating_point()


@contextmanager
def lifted(gm: GraphModule) -> Iterator[GraphModule]:
    """``gm`` with each integer constant that an op reads as an input behind an ``aten.lift_fresh_copy``."""
    added: list[tuple[Node, Node, Node]] = []
    for node in list(gm.graph.nodes):
        spec = spec_of(node) if node.op == "call_function" else None
        if spec is None:
            continue
        bound = spec.bind(node)
        for name in spec.inputs:
            arg = bound.get(name)
            if _integer_constant(arg):
                with gm.graph.inserting_before(node):
                    copy = gm.graph.call_function(aten.lift_fresh_copy.default, (arg,))
                copy.meta = dict(arg.meta)
                node.replace_input_with(arg, copy)
                added.append((node, arg, copy))
    try:
        yield gm
    finally:
        for node, arg, copy in reversed(added):
            node.replace_input_with(copy, arg)
            gm.graph.erase_node(copy)


@aten_lowering(aten.lift_fresh_copy.default)
def lower_lift(builder, node: Node):
    return operand(builder, node.args[0], node.name)
