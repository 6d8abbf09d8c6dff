"""Per-layer facts recorded at quantize time for ``report.html`` and ``qpipe inspect``.

What an output folder cannot tell afterwards (its integer weights live in the
target's model file, the float model is gone) is taken here from the graphs
while they are in memory, and stored in ``qpipe.json`` under ``"layer_facts"``:

* ``accumulators``: for every op with an integer weight, the ingredients of the
  proof that its accumulator fits: the reduction length K, the largest input
  magnitude the producer allows, the largest weight and bias, and the bound
  ``K * max|x| * max|w| + max|b|`` against the accumulator's signed limit;
* ``sqnr``: each integer tensor (dequantized at its scale) against the float
  model's tensor at the same point, on one calibration batch. The error is
  cumulative (the integer graph runs on its own integer inputs), which is what a
  user sees at that layer. Matched through provenance: an integer node stands for
  the float nodes it came from plus the single-user activation/dropout chain after
  them that no other integer node claims (a ReLU folded into a clamp);
* ``float_graph`` / ``integer_graph``: name, op, shape and inputs of each compute
  node, for the before/after drawing.

All of it is cheap next to calibration: one float and one integer forward pass.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

import torch
from torch.fx import GraphModule, Interpreter, Node

from qpipe.ir.graph_utils import fetch_attr
from qpipe.ir.meta import PROVENANCE, QPARAMS
from qpipe.ir.opspec import OpKind, spec_of
from qpipe.ir.printer import SymbolNames, target_name
from qpipe.ir.qtype import qtype_of

FACTS_KEY = "layer_facts"
FACTS_VERSION = 1

# float ops an integer node may absorb after its last named source (folded into its clamp)
_PASS_THROUGH = {
    "aten.relu.default", "aten.relu_.default", "aten.hardtanh.default", "aten.hardtanh_.default",
    "aten.clamp.default", "aten.clamp_min.default", "aten.dropout.default", "aten.clone.default",
    "aten.alias.default", "aten.detach.default", "aten.contiguous.default",
}


def _node_inputs(node: Node) -> list[str]:
    out: list[str] = []
    for a in node.all_input_nodes:
        if a.op != "get_attr" and a.name not in out:
            out.append(a.name)
    return out


def graph_rows(gm: GraphModule) -> list[dict[str, Any]]:
    """Compute nodes in order: name, op, output shape and the compute nodes they read."""
    syms = SymbolNames(gm)
    rows = []
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "call_function", "call_module"):
            continue
        val = node.meta.get("val")
        rows.append({
            "name": node.name,
            "op": "input" if node.op == "placeholder" else target_name(node),
            "shape": [syms.fmt_dim(d) for d in val.shape] if isinstance(val, torch.Tensor) else None,
            "inputs": _node_inputs(node),
        })
    return rows


def input_abs_max(node: Node) -> tuple[int, str]:
    """The largest |value| an integer tensor can hold, and why: its producer's clamp, else its bit width."""
    seen = 0
    while node is not None and seen < 64:
        spec = spec_of(node)
        if spec is not None and spec.clamp:
            values = spec.bind(node)
            lo, hi = (int(values[n]) for n in spec.clamp)
            return max(abs(lo), abs(hi)), f"clamp [{lo}, {hi}] of %{node.name}"
        if spec is not None and spec.kind is OpKind.QUANTIZE:
            bits = int(spec.bind(node)[spec.out_bits]) if spec.out_bits else 8
            hi = (1 << (bits - 1)) - 1
            return hi + 1, f"quantize clamp [-{hi + 1}, {hi}] of %{node.name}"
        if spec is not None and spec.kind is OpKind.LAYOUT and node.all_input_nodes:
            node = node.all_input_nodes[0]  # moves values, keeps their range
            seen += 1
            continue
        break
    qt = qtype_of(node) if node is not None else None
    if qt is not None and qt.unsigned:
        return qt.max_abs, f"u{qt.bits} bit width"
    bits = qt.bits if qt is not None else 8
    return 1 << (bits - 1), f"i{bits} bit width"


def accumulator_facts(gm: GraphModule) -> dict[str, dict[str, Any]]:
    """The no-overflow proof of every weighted integer op, by node name (see the module docstring)."""
    out: dict[str, dict[str, Any]] = {}
    for node in gm.graph.nodes:
        spec = spec_of(node)
        if spec is None or spec.weight is None or spec.kind not in (OpKind.ACCUMULATE, OpKind.REQUANTIZE):
            continue
        values = spec.bind(node)
        w_node = values[spec.weight]
        if not isinstance(w_node, Node) or w_node.op != "get_attr":
            continue
        w = fetch_attr(gm, w_node.target).detach().to(torch.int64)
        b_node = values.get(spec.bias) if spec.bias else None
        b = fetch_attr(gm, b_node.target).detach().to(torch.int64).flatten() if isinstance(b_node, Node) else None
        x_max, x_why = input_abs_max(values[spec.inputs[0]])
        per_channel = w.reshape(w.shape[0], -1)
        k = int(per_channel.shape[1])
        if w.dim() >= 3:  # conv: (C_out, C_in/groups, *kernel)
            groups = int(values.get("groups", 1))
            kernel = [int(d) for d in w.shape[2:]]
            k_formula = f"C_in/groups {int(w.shape[1])} x kernel {'x'.join(map(str, kernel))}"
        else:  # linear: (out_features, in_features)
            groups, kernel = 1, []
            k_formula = f"in_features {k}"
        w_max = int(w.abs().max()) if w.numel() else 0
        b_max = int(b.abs().max()) if b is not None and b.numel() else 0
        bound = k * x_max * w_max + b_max
        row_sum = per_channel.abs().sum(dim=1) * x_max
        if b is not None and b.numel() == row_sum.numel():
            row_sum = row_sum + b.abs()
        tight = int(row_sum.max()) if row_sum.numel() else 0
        q = node.meta.get(QPARAMS, {}) or {}
        acc_bits = int(q.get("acc_bits", values.get("acc_bits", 32)))
        limit = (1 << (acc_bits - 1)) - 1
        wq = qtype_of(w_node)
        out[node.name] = {
            "op": target_name(node),
            "from": list(node.meta.get(PROVENANCE, []))[:1],
            "k": k,
            "k_formula": k_formula,
            "groups": groups,
            "kernel": kernel,
            "x_abs_max": x_max,
            "x_why": x_why,
            "w_bits": wq.bits if wq is not None else 8,
            "w_abs_max": w_max,
            "b_abs_max": b_max,
            "bound": bound,
            "tight_bound": tight,
            "acc_bits": acc_bits,
            "limit": limit,
            "fits": bound <= limit,
            "recorded_bound": q.get("acc_bound"),
        }
    return out


def _sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> Optional[float]:
    ref = ref.to(torch.float64)
    err = float(((ref - test.to(torch.float64)) ** 2).sum())
    sig = float((ref**2).sum())
    if err == 0:
        return None if sig == 0 else math.inf
    if sig == 0:
        return None
    return 10 * math.log10(sig / err)


class _Capture(Interpreter):
    def __init__(self, gm: GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted and isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach()
        return out


def _float_name(source: str) -> str:
    return source.rsplit(":", 1)[-1]


def float_counterparts(float_gm: GraphModule, int_gm: GraphModule) -> dict[str, str]:
    """Integer node name -> the float node whose value it stands for (see the module docstring)."""
    fnodes = {n.name: n for n in float_gm.graph.nodes}
    order = {n.name: i for i, n in enumerate(float_gm.graph.nodes)}
    claimed = {_float_name(s) for n in int_gm.graph.nodes for s in n.meta.get(PROVENANCE, [])}
    out = {}
    for node in int_gm.graph.nodes:
        if node.op not in ("call_function", "call_module") or qtype_of(node) is None:
            continue
        names = [_float_name(s) for s in node.meta.get(PROVENANCE, []) if _float_name(s) in fnodes]
        if not names:
            continue
        f = fnodes[max(names, key=order.__getitem__)]
        while len(f.users) == 1:
            (user,) = f.users
            if user.name in claimed or user.op != "call_function" or str(user.target) not in _PASS_THROUGH:
                break
            f = user
        out[node.name] = f.name
    return out


def per_layer_sqnr(float_gm: GraphModule, int_gm: GraphModule, x: torch.Tensor) -> dict[str, dict[str, Any]]:
    """SQNR (dB) of each integer tensor, dequantized, against its float counterpart on input ``x``."""
    pairs = float_counterparts(float_gm, int_gm)
    if not pairs:
        return {}
    with torch.no_grad():
        fcap = _Capture(float_gm, set(pairs.values()))
        fcap.run(x)
        icap = _Capture(int_gm, set(pairs))
        icap.run(x)
    out = {}
    for iname, fname in pairs.items():
        q, ref = icap.values.get(iname), fcap.values.get(fname)
        if q is None or ref is None or tuple(q.shape) != tuple(ref.shape) or q.is_floating_point():
            continue
        node = next(n for n in int_gm.graph.nodes if n.name == iname)
        qt = qtype_of(node)
        scale = torch.tensor(qt.scales, dtype=torch.float64)
        if qt.per_channel:
            shape = [1] * q.dim()
            shape[qt.axis % q.dim()] = -1
            scale = scale.reshape(shape)
        db = _sqnr_db(ref, q.to(torch.float64) * scale)
        out[iname] = {"float_node": fname, "sqnr_db": None if db is None else (round(db, 3) if math.isfinite(db) else "inf")}
    return out


def collect_layer_facts(float_gm: GraphModule, int_gm: GraphModule, inputs: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Everything ``report.html`` needs beyond the node table; SQNR on the first calibration batch."""
    facts: dict[str, Any] = {
        "version": FACTS_VERSION,
        "float_graph": graph_rows(float_gm),
        "integer_graph": graph_rows(int_gm),
        "accumulators": accumulator_facts(int_gm),
    }
    if inputs:
        facts["sqnr"] = per_layer_sqnr(float_gm, int_gm, inputs[0])
        facts["sqnr_input_shape"] = list(inputs[0].shape)
    return facts


def layer_facts_quietly(float_gm: GraphModule, int_gm: GraphModule, inputs: Sequence[torch.Tensor]) -> dict[str, Any]:
    """For the quantize hook: ``{"layer_facts": ...}``, or ``{}`` and one warning line if they cannot be taken."""
    import sys

    try:
        return {FACTS_KEY: collect_layer_facts(float_gm, int_gm, inputs)}
    except Exception as exc:  # noqa: BLE001 - the report's facts must never fail a quantization
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"qpipe: warning: per-layer report facts not recorded: {type(exc).__name__}: {first}", file=sys.stderr)
        return {}


_QTEXT_INT = re.compile(r"\b(acc_bound|acc_bits)=(\d+)")


def accumulator_table(rows: list[dict[str, Any]], layer_facts: Optional[dict[str, Any]] = None) -> dict[str, dict[str, Any]]:
    """Per weighted layer: ``|acc| <= K * max|x| * max|w| + max|b|`` against the signed accumulator limit.

    The full proof (K, max|x| and why, max|w|, max|b|) comes from ``layer_facts``
    (recorded at quantize time, or computed from a live graph); an older folder or
    an IR dump (``rows`` from ``qpipe.inspect.parse_ir``) has only the bound the lowering recorded (``acc_bound``), shown as such.
    Every row has ``bound``, ``acc_bits``, ``limit``, ``int32_limit``, ``margin``
    (limit / bound), ``headroom_bits`` and ``fits_int32``.
    """
    proofs = (layer_facts or {}).get("accumulators") or {}
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        name = row.get("name")
        if name in proofs:
            r = dict(proofs[name], source="proof")
        else:
            q = row.get("qparams") or {}
            if "acc_bound" not in q and row.get("qparams_text"):
                q = {k: int(v) for k, v in _QTEXT_INT.findall(row["qparams_text"])}
            if "acc_bound" not in q:
                continue
            bits = int(q.get("acc_bits", 32))
            r = {"op": row.get("op", ""), "bound": int(q["acc_bound"]), "acc_bits": bits,
                 "limit": (1 << (bits - 1)) - 1, "source": "recorded"}
        bound = int(r["bound"])
        int32 = (1 << 31) - 1
        r["int32_limit"] = int32
        r["fits_int32"] = bound <= int32
        r["fits"] = bound <= int(r["limit"])
        r["margin"] = (int(r["limit"]) / bound) if bound else math.inf
        r["headroom_bits"] = math.log2(int(r["limit"]) / bound) if bound else math.inf
        out[name] = r
    return out


def fmt_acc(r: Optional[dict[str, Any]]) -> str:
    """``532,257 <= 2^31-1 (4035x)``; a bound over its limit says OVERFLOW."""
    if not r:
        return ""
    bits = int(r["acc_bits"])
    rel = "<=" if r["fits"] else "> OVERFLOW"
    return f"{int(r['bound']):,} {rel} 2^{bits - 1}-1 ({r['margin']:.0f}x)"
