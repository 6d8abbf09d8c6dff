"""Deterministic text form of a graph: one node per line, with dtype, shape and qparams.

    %conv_3 = qpipe.conv1d_rq(%x_2, %w_3, %b_3, m=%m_3, s=%s_3, ..., bits=8) {out_scale=0.0123, ...} : i8[1,256,T] q8<0.0123>

``qpipe::`` ops print their tensor inputs (and weight, bias) by position and every
other argument by its schema name, from the op's spec; the integer type's scale
(``meta["qtype"]``) follows the tensor type.

Tests check it with ``torch.testing.FileCheck`` the way MLIR tests check passes,
and ``--print-diff`` diffs two of these.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qpipe.ir.meta import PROVENANCE, QPARAMS, QPOLICY
from qpipe.ir.opspec import spec_of
from qpipe.ir.qtype import qtype_of

_DTYPE = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "i1",
}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE.get(dtype, str(dtype).replace("torch.", ""))


def target_name(node: Node) -> str:
    t = node.target
    if node.op == "call_function":
        if isinstance(t, torch._ops.OpOverload):
            ns = t.namespace
            name = t._schema.name.split("::", 1)[1]
            overload = t._overloadname
            return f"{ns}.{name}" + ("" if overload == "default" else f".{overload}")
        return getattr(t, "__qualname__", None) or getattr(t, "__name__", str(t))
    if node.op == "call_module":
        return f"module[{t}]"
    if node.op == "get_attr":
        return f"get_attr[{t}]"
    if node.op == "placeholder":
        return "input"
    return str(node.op)


def _fmt_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isfinite(v) and v == int(v) and abs(v) < 1e15:
            return f"{v:.1f}"
        return f"{v:.6g}"
    if isinstance(v, torch.dtype):
        return dtype_name(v)
    return str(v)


def _fmt_value(v: Any) -> str:
    if isinstance(v, Node):
        return f"%{v.name}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    if isinstance(v, torch.Tensor):
        return _fmt_tensor_const(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={_fmt_value(x)}" for k, x in v.items()) + "}"
    return _fmt_scalar(v)


def _fmt_tensor_const(t: torch.Tensor) -> str:
    flat = t.detach().flatten()
    if flat.numel() == 1:
        return _fmt_scalar(flat.item())
    first = _fmt_scalar(flat[0].item())
    if bool((flat == flat[0]).all()):
        return f"[{first} x{flat.numel()}]"
    return f"[{first}.. x{flat.numel()}]"


def _fmt_qmeta(d: dict) -> str:
    parts = []
    for key in sorted(d):
        value = d[key]
        if isinstance(value, (list, tuple)) and len(value) > 4:
            value = torch.tensor(value)
        parts.append(f"{key}={_fmt_value(value)}")
    return "{" + ", ".join(parts) + "}"


class SymbolNames:
    """Names symbolic sizes by first appearance (T, T1, ...) so output is stable across runs."""

    def __init__(self, gm: GraphModule):
        self.names: dict[str, str] = dict(gm.meta.get("qpipe_dim_names", {}))

    def fmt_dim(self, d) -> str:
        if isinstance(d, int):
            return str(d)
        expr = d.node.expr if hasattr(d, "node") else d
        text = str(expr)
        for sym in sorted(getattr(expr, "free_symbols", ()), key=lambda s: str(s)):
            key = str(sym)
            if key not in self.names:
                self.names[key] = "T" if not self.names else f"T{len(self.names)}"
        for key in sorted(self.names, key=len, reverse=True):
            text = text.replace(key, self.names[key])
        return text.replace(" ", "")


def _fmt_type(val: Any, syms: SymbolNames) -> str:
    if isinstance(val, torch.Tensor):
        dims = ",".join(syms.fmt_dim(d) for d in val.shape)
        return f"{dtype_name(val.dtype)}[{dims}]"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(_fmt_type(v, syms) for v in val) + ")"
    if val is None:
        return "?"
    return type(val).__name__


def format_node(node: Node, syms: SymbolNames, with_provenance: bool = False) -> str:
    if node.op == "output":
        return "return " + _fmt_value(node.args[0])
    head = f"%{node.name} = {target_name(node)}"
    spec = spec_of(node)
    if spec is not None:
        positional = {spec.arg_names[0], *spec.inputs, spec.weight, spec.bias}
        given = set(spec.arg_names[: len(node.args)]) | set(node.kwargs)  # a schema default left out is not printed
        args = [
            _fmt_value(v) if name in positional else f"{name}={_fmt_value(v)}"
            for name, v in spec.bind(node).items() if name in given
        ]
        head += "(" + ", ".join(args) + ")"
    elif node.op in ("call_function", "call_module"):
        args = [_fmt_value(a) for a in node.args]
        args += [f"{k}={_fmt_value(v)}" for k, v in node.kwargs.items()]
        head += "(" + ", ".join(args) + ")"
    q = {}
    policy = node.meta.get(QPOLICY)
    if policy is not None:
        q.update(policy.describe() if hasattr(policy, "describe") else policy)
    q.update(node.meta.get(QPARAMS, {}) or {})
    if q:
        head += " " + _fmt_qmeta(q)
    head += " : " + _fmt_type(node.meta.get("val"), syms)
    qtype = qtype_of(node)
    if qtype is not None:
        head += f" {qtype}"
    if with_provenance and node.meta.get(PROVENANCE):
        head += "  # from " + ", ".join(node.meta[PROVENANCE])
    return head


def print_ir(gm: GraphModule, with_provenance: bool = False, include_params: bool = True) -> str:
    """The whole graph as text (stage on the first line)."""
    from qpipe.ir.stages import graph_stage

    syms = SymbolNames(gm)
    lines = [f"// stage: {graph_stage(gm)}"]
    for node in gm.graph.nodes:
        if node.op == "get_attr" and not include_params:
            continue
        lines.append(format_node(node, syms, with_provenance))
    return "\n".join(lines) + "\n"
