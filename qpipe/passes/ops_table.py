"""How the passes classify float ATen ops: what they quantize and what passes through."""
from __future__ import annotations

import torch
from torch.fx import Node

from qpipe.ir.verifier import LAYOUT_OPS

aten = torch.ops.aten

CONV_OPS = frozenset({aten.conv1d.default})
LINEAR_OPS = frozenset({aten.linear.default})
ADD_OPS = frozenset({aten.add.Tensor})
ACTIVATION_OPS = frozenset({aten.relu.default, aten.hardtanh.default, aten.clamp.default})
DROPOUT_OPS = frozenset({aten.dropout.default, aten.alpha_dropout.default, aten.feature_dropout.default})
# Monotone per-row shifts: argmax (greedy CTC) is unchanged without them.
TAIL_OPS = frozenset({aten.log_softmax.int, aten._log_softmax.default})
TRANSPARENT = LAYOUT_OPS | DROPOUT_OPS


def is_call(node: Node, ops) -> bool:
    return node.op == "call_function" and node.target in ops


def conv_args(node: Node) -> tuple:
    """``aten.conv1d(x, w, bias=None, stride=[1], padding=[0], dilation=[1], groups=1)`` with defaults filled."""
    defaults = (None, None, None, [1], [0], [1], 1)
    args = list(node.args) + list(defaults[len(node.args):])
    for i, key in enumerate(("input", "weight", "bias", "stride", "padding", "dilation", "groups")):
        if key in node.kwargs:
            args[i] = node.kwargs[key]
    x, w, b, stride, padding, dilation, groups = args
    if isinstance(padding, str):
        raise ValueError(f"conv1d with padding='{padding}' is not supported; export with explicit padding")
    return x, w, b, list(stride), list(padding), list(dilation), int(groups)


def activation_bounds(node: Node) -> tuple[float, float]:
    """The real-valued clamp an activation node applies."""
    if node.target is aten.relu.default:
        return 0.0, float("inf")
    if node.target is aten.hardtanh.default:
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        return float(lo), float(hi)
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    return (float("-inf") if lo is None else float(lo)), (float("inf") if hi is None else float(hi))


SUPPORTED = CONV_OPS | LINEAR_OPS | ADD_OPS | ACTIVATION_OPS | DROPOUT_OPS | TAIL_OPS | LAYOUT_OPS


def unsupported_ops(gm) -> dict[str, int]:
    """Ops fed by the model input that have no integer kernel yet, with counts.

    Shape arithmetic that does not depend on input values (sizes, aranges)
    is not counted: it is not fed by a float tensor of the input.
    """
    from collections import Counter

    from qpipe.ir.printer import target_name

    fed: set = set()
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            fed.add(node)
            continue
        if node.op not in ("call_function", "call_module") or not any(a in fed for a in node.all_input_nodes):
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        fed.add(node)
        if node.op == "call_module" or node.target in SUPPORTED:
            continue
        counts[target_name(node)] += 1
    return dict(sorted(counts.items()))
