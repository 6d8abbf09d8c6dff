"""What each stage allows, as tables, and the check that a graph keeps to them.

The integer stage is the contract that matters: every node between an input
``qpipe.quantize`` and the graph output is an integer tensor made by a ``qpipe::``
op (the table comes from the op specs) or a layout op; each carries a
``meta["qtype"]`` whose scale follows from its inputs' and its dyadic pair's. Each
offender is named with its provenance.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from qpipe.ir import ops as _ops  # noqa: F401  (registers the op specs the tables come from)
from qpipe.ir.errors import QpipeError
from qpipe.ir.graph_utils import fetch_attr
from qpipe.ir.meta import QPARAMS, source_name
from qpipe.ir.opspec import OpKind, ScaleRule, all_specs, spec_of
from qpipe.ir.ops.kernels import dtype_for_bits
from qpipe.ir.printer import target_name
from qpipe.ir.qtype import QType, qtype_of
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

# Every qpipe:: op but the quantizer (the boundary into the region) and dequantize.
INTEGER_OPS = frozenset(spec.op for spec in all_specs() if spec.kind is not OpKind.QUANTIZE)
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


def _const(gm: GraphModule, arg) -> torch.Tensor | None:
    if isinstance(arg, Node) and arg.op == "get_attr":
        value = fetch_attr(gm, arg.target)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _channel_scales(q: QType, channels: int) -> list[float]:
    return list(q.scales) if q.per_channel else [float(q.scale)] * channels


# m * 2**-s is the rounded ratio: |ratio * 2**s - m| <= 1/2, and float64 slack on top. A float32
# multiplier (``f32=True``: fl32(fl32(S_x*S_w)/S_y), four float32 roundings of 24-bit values) is
# within 4 units of its 24-bit m instead.
_SLACK = 1e-9
_F32_UNITS = 4.0


def _dyadic_agrees(in_scale: float, m: int, s: int, out_scale: float, units: float = 0.5) -> bool:
    ratio = in_scale / out_scale
    return abs(ratio * 2.0**s - m) <= units + _SLACK * max(1.0, ratio * 2.0**s)


def qtype_violations(gm: GraphModule) -> list[str]:
    """Every integer tensor has a qtype whose bits fit its dtype and whose scale follows the op's rule."""
    problems = []
    for node in [*quantizers(gm), *integer_region(gm)]:
        where = f"%{node.name} = {target_name(node)} (from {source_name(node)})"
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        q = qtype_of(node)
        if q is None:
            problems.append(f"{where}: no meta['qtype']")
            continue
        if val.dtype in INTEGER_DTYPES and dtype_for_bits(q.bits) != val.dtype and not (q.bits <= 8 and val.dtype == torch.uint8):
            problems.append(f"{where}: qtype {q} does not fit its dtype {val.dtype}")
        spec = spec_of(node)
        if spec is None:  # a layout op: the scale of its input
            src = next((a for a in node.all_input_nodes if qtype_of(a) is not None), None)
            if src is not None and qtype_of(src) != q and not qtype_of(src).per_channel:
                problems.append(f"{where}: layout op changes the qtype {qtype_of(src)} -> {q}")
            continue
        values = spec.bind(node)
        problems += [f"{where}: {p}" for p in _scale_rule_problems(gm, spec, values, q, val.dim())]
    return problems


def _scale_rule_problems(gm: GraphModule, spec, values: dict, q: QType, ndim: int) -> list[str]:
    ins = [qtype_of(values[name]) if isinstance(values[name], Node) else None for name in spec.inputs]
    if any(i is None for i in ins):
        return [f"an input of qpipe.{spec.name} has no qtype"]
    rule = spec.scale_rule
    if rule is ScaleRule.ARGUMENT:
        return [] if q.scale == float(values[spec.scale_arg]) else [f"scale {q.scale} is not the op's scale argument {values[spec.scale_arg]}"]
    if rule is ScaleRule.INHERITED:
        return [] if q == ins[0] else [f"an op that keeps its input's scale changed it: {ins[0]} -> {q}"]
    if rule is ScaleRule.FIXED and spec.fixed_scale is not None:
        expect = spec.fixed_scale(values)
        return [] if abs(q.scale - expect) <= 1e-12 * expect else [f"scale {q.scale} is not the kernel's fixed scale {expect:.9g}"]
    if rule is ScaleRule.OBSERVED and spec.product_scale is not None:
        return _product_scale_problems(gm, spec, values, q, ins)
    w_scales = None
    if spec.weight:
        wq = qtype_of(values[spec.weight])
        if wq is None:
            return [f"weight {values[spec.weight]} has no qtype"]
        w_scales = wq.scales
    if rule is ScaleRule.PRODUCT:
        expect = [ins[0].scale * ws for ws in w_scales] if w_scales else None
        got = _channel_scales(q, len(expect)) if expect else []
        if expect and any(abs(g - e) > 1e-12 * e for g, e in zip(got, expect)):
            return [f"accumulator scale {q} is not input scale x weight scale"]
        return []
    if rule is ScaleRule.OBSERVED:
        shift = _const(gm, values[spec.shift])
        if shift is None or shift.dtype != torch.int64:
            return [f"shift '{spec.shift}' is not an int64 tensor constant"]
        problems = []
        for name, in_q in zip(spec.multipliers, ins):
            m = _const(gm, values[name])
            if m is None or m.dtype != torch.int64:
                problems.append(f"multiplier '{name}' is not an int64 tensor constant")
                continue
            channels = max(m.numel(), shift.numel(), len(q.scales), len(w_scales or ()))
            in_scales = _channel_scales(in_q, channels)
            if w_scales is not None:
                in_scales = [a * b for a, b in zip(in_scales, _channel_scales(QType.of(8, w_scales, 0), channels))]
            ms = m.flatten().tolist() * (channels if m.numel() == 1 else 1)
            ss = shift.flatten().tolist() * (channels if shift.numel() == 1 else 1)
            outs = _channel_scales(q, channels)
            units = _F32_UNITS if values.get("f32") else 0.5
            bad = [c for c in range(channels) if not _dyadic_agrees(in_scales[c], ms[c], ss[c], outs[c], units)]
            if bad:
                c = bad[0]
                problems.append(
                    f"({name}, s) = ({ms[c]}, {ss[c]}) at channel {c} does not take scale {in_scales[c]:.6g} "
                    f"to the output scale {outs[c]:.6g} (ratio {in_scales[c] / outs[c]:.9g})"
                )
        return problems
    return []


def _product_scale_problems(gm: GraphModule, spec, values: dict, q: QType, ins: list) -> list[str]:
    """One dyadic pair from the product of per-tensor inputs (x * gate, a * b, a mean) to the output scale."""
    if any(i.per_channel for i in ins) or q.per_channel:
        return [f"qpipe.{spec.name} needs per-tensor scales"]
    m, shift = _const(gm, values[spec.multipliers[0]]), _const(gm, values[spec.shift])
    if m is None or shift is None or m.dtype != torch.int64 or shift.dtype != torch.int64 or m.numel() != 1 or shift.numel() != 1:
        return [f"(m, s) of qpipe.{spec.name} are not one-value int64 tensor constants"]
    product = spec.product_scale(tuple(float(i.scale) for i in ins), values)
    if not _dyadic_agrees(product, int(m.item()), int(shift.item()), float(q.scale)):
        return [f"(m, s) = ({int(m.item())}, {int(shift.item())}) does not take the product scale {product:.6g} "
                f"to the output scale {float(q.scale):.6g}"]
    return []


def quantizers(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and spec_of(n) is not None and spec_of(n).kind is OpKind.QUANTIZE]


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
        problems += qtype_violations(gm)
    if problems:
        listing = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise QpipeError(f"{stage} stage verifier: {len(problems)} problem(s):\n  {listing}{more}")
