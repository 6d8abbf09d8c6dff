"""``qpipe inspect`` and ``qpipe diff``: per-layer facts and what changed between two graphs.

Both work from node tables (name, op, dtype, shape, policy, qparams, provenance):
an output folder stores one in qpipe.json; a model runs through a pipeline and
the table is taken from the resulting graph; a printed-IR dump (``--dump-dir``)
is parsed back line by line.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from qpipe.ir.errors import QpipeError


@dataclass
class GraphFacts:
    label: str
    rows: list[dict[str, Any]]
    ir_text: str
    metrics: dict[str, Any]
    stage: str
    layer_facts: dict[str, Any] = field(default_factory=dict)  # qpipe.report_facts: the accumulator proofs, SQNR


_LINE = re.compile(r"^%(?P<name>[\w.]+) = (?P<op>[^\s(]+)(?P<rest>.*?)(?: : (?P<type>[^:]+?))?(?:  # from (?P<src>.*))?$")


def parse_ir(text: str) -> list[dict[str, Any]]:
    """Rows from printed IR: enough for diffing stages dumped by --dump-dir."""
    rows = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m or m.group("op").startswith("get_attr"):
            continue
        rest = m.group("rest") or ""
        qmeta = ""
        brace = rest.rfind(" {")
        if brace >= 0 and rest.endswith("}"):
            qmeta = rest[brace + 1 :]
        rows.append(
            {
                "name": m.group("name"),
                "op": m.group("op"),
                "type": (m.group("type") or "").strip(),
                "qparams_text": qmeta,
                "from": [s.strip() for s in (m.group("src") or "").split(",") if s.strip()],
            }
        )
    return rows


def facts_from_path(path: str, passes: Optional[str] = None, progress: bool = False) -> GraphFacts:
    """An output folder, a printed-IR .txt, or a model (run through ``passes``)."""
    from qpipe.backends.folder import is_output_folder, read_meta

    if is_output_folder(path):  # any target: the facts are in qpipe.json and ir.txt
        meta = read_meta(path)
        ir_path = os.path.join(path, "ir.txt")
        ir_text = open(ir_path, encoding="utf-8").read() if os.path.isfile(ir_path) else ""
        return GraphFacts(path, meta.get("nodes", []), ir_text, meta.get("metrics", {}), "integer", meta.get("layer_facts") or {})
    if os.path.isfile(path) and path.endswith(".txt"):
        text = open(path, encoding="utf-8").read()
        stage = text.splitlines()[0].replace("// stage:", "").strip() if text.startswith("// stage:") else "?"
        return GraphFacts(path, parse_ir(text), text, {}, stage)
    from qpipe.api import quantize
    from qpipe.backends.folder import node_table
    from qpipe.ir.printer import print_ir
    from qpipe.ir.stages import graph_stage

    if passes:
        result = quantize(path, passes=passes, progress=progress)
        gm, metrics = result.gm, result.metrics
    else:
        from qpipe.api import load_model

        gm, metrics = load_model(path).gm, {}
    from qpipe.report_facts import accumulator_facts

    return GraphFacts(path, node_table(gm), print_ir(gm, with_provenance=True, include_params=False), metrics,
                      str(graph_stage(gm)), {"accumulators": accumulator_facts(gm)})


def _fmt_scale(v: Any) -> str:
    if isinstance(v, (int, float)):
        return f"{v:.4g}"
    if isinstance(v, list) and v:
        nums = [x for x in v if isinstance(x, (int, float))]
        if nums:
            return f"{min(nums):.3g}..{max(nums):.3g}"
    return ""


def accumulator_rows(facts: GraphFacts) -> dict[str, dict[str, Any]]:
    """Per weighted layer, the accumulator bound against its limit (qpipe.report_facts.accumulator_table)."""
    from qpipe.report_facts import accumulator_table

    return accumulator_table(facts.rows, facts.layer_facts)


def layer_rows(facts: GraphFacts) -> list[dict[str, Any]]:
    """The inspect table: one row per node that computes (no placeholders or views)."""
    out = []
    from qpipe.report_facts import fmt_acc

    accs = accumulator_rows(facts)
    for row in facts.rows:
        q = row.get("qparams", {}) or {}
        p = row.get("policy", {}) or {}
        op = row.get("op", "")
        if op == "input" and not q:
            continue
        shape = row.get("shape")
        out.append(
            {
                "node": row["name"],
                "op": op,
                "out": f"{row.get('dtype') or ''}[{','.join(shape)}]" if shape else row.get("type", ""),
                "bits": q.get("bits", p.get("bits", p.get("w_bits", ""))),
                "in_scale": q.get("in_scale", ""),
                "w_scale": q.get("w_scale", ""),
                "out_scale": q.get("out_scale", q.get("scale", "")),
                "saturation": q.get("saturation", ""),
                "acc_bound": accs.get(row["name"], {}).get("bound", ""),
                "acc": fmt_acc(accs.get(row["name"])),
                "from": ", ".join(row.get("from", [])[:2]),
            }
        )
    return out


def make_console():
    """A rich console; piped output gets a wide fixed width so tables do not fold."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=220)


def render_inspect(facts: GraphFacts, console=None) -> None:
    from rich.table import Table

    console = console or make_console()
    table = Table(title=f"{facts.label} ({facts.stage} stage)", show_lines=False)
    for col in ("node", "op", "out", "bits", "in scale", "w scale", "out scale", "saturated", "acc bound <= limit (margin)"):
        table.add_column(col, no_wrap=True)
    table.add_column("from", overflow="ellipsis", max_width=60, no_wrap=True)
    from rich.markup import escape

    for r in layer_rows(facts):
        sat = r["saturation"]
        table.add_row(
            escape(r["node"]),
            escape(r["op"]),
            escape(r["out"]),
            str(r["bits"]),
            _fmt_scale(r["in_scale"]),
            _fmt_scale(r["w_scale"]),
            _fmt_scale(r["out_scale"]),
            f"{sat * 100:.3f}%" if isinstance(sat, (int, float)) else "",
            escape(r["acc"]),
            escape(r["from"]),
        )
    console.print(table)
    accs = accumulator_rows(facts)
    if accs:
        worst = min(accs, key=lambda n: accs[n]["margin"])
        over = [n for n, a in accs.items() if not a["fits"]]
        verdict = (f"{len(over)} of {len(accs)} accumulators can overflow: {', '.join(over)}" if over else
                   f"all {len(accs)} accumulators fit their signed limit; smallest margin {accs[worst]['margin']:.0f}x at %{worst}")
        console.print(verdict, highlight=False, markup=False)
    if facts.metrics:
        m = facts.metrics
        if "logprob_sqnr_db" in m:
            console.print(
                f"log-prob SQNR vs float on the calibration inputs: {m['logprob_sqnr_db']} dB; "
                f"argmax agreement {m.get('argmax_agreement', float('nan')) * 100:.2f}%"
            )
        if "float_mb" in m:
            console.print(f"weights+constants: {m['float_mb']} MB float -> {m['final_mb']} MB")


def inspect_json(facts: GraphFacts) -> dict[str, Any]:
    return {"source": facts.label, "stage": facts.stage, "layers": layer_rows(facts), "metrics": facts.metrics}


def _comparable(row: dict[str, Any]) -> dict[str, Any]:
    keep = {k: row.get(k) for k in ("op", "dtype", "shape", "type", "qparams", "qparams_text", "policy")}
    return {k: v for k, v in keep.items() if v not in (None, {}, "", [])}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        if v and all(isinstance(x, (int, float)) for x in v):
            lo, hi = min(v), max(v)
            return f"[{_fmt_value(lo)}..{_fmt_value(hi)} x{len(v)}]" if len(v) > 4 else "[" + ", ".join(_fmt_value(x) for x in v) + "]"
        return "[" + ",".join(str(x) for x in v) + "]" if len(v) <= 8 else f"[{v[0]}, ... x{len(v)}]"
    return "-" if v is None else str(v)


def value_change(field_name: str, old: Any, new: Any) -> dict[str, Any]:
    """One changed value as ``old -> new``; equal-length number lists say how many entries changed and by how much."""
    text = f"{_fmt_value(old)} -> {_fmt_value(new)}"
    change: dict[str, Any] = {"field": field_name, "old": old, "new": new}
    if (isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and old
            and all(isinstance(x, (int, float)) for x in old + new)):
        diffs = [(i, x, y) for i, (x, y) in enumerate(zip(old, new)) if x != y]
        i, x, y = max(diffs, key=lambda t: abs(t[2] - t[1]) / (abs(t[1]) or 1.0))
        text = f"{len(diffs)} of {len(old)} changed, largest [{i}] {_fmt_value(x)} -> {_fmt_value(y)}"
        if x:
            text += f" ({(y - x) / abs(x) * 100:+.3g}%)"
        change["changed_entries"] = len(diffs)
    elif isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool) and old:
        text += f" ({(new - old) / abs(old) * 100:+.3g}%)"
    change["text"] = text
    return change


def diff_facts(a: GraphFacts, b: GraphFacts) -> dict[str, Any]:
    ra = {r["name"]: r for r in a.rows}
    rb = {r["name"]: r for r in b.rows}
    added = [n for n in rb if n not in ra]
    removed = [n for n in ra if n not in rb]
    changed = []
    for name in ra:
        if name in rb and _comparable(ra[name]) != _comparable(rb[name]):
            ca, cb = _comparable(ra[name]), _comparable(rb[name])
            keys = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
            fa, fb = _flatten(ca), _flatten(cb)
            values = [value_change(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
            changed.append({"name": name, "fields": keys, "changes": values})
    return {
        "a": a.label,
        "b": b.label,
        "a_stage": a.stage,
        "b_stage": b.stage,
        "added": [{"name": n, "op": rb[n].get("op"), "from": rb[n].get("from", [])} for n in added],
        "removed": [{"name": n, "op": ra[n].get("op")} for n in removed],
        "changed": changed,
    }


def text_diff(a: GraphFacts, b: GraphFacts) -> str:
    if a.ir_text == b.ir_text:
        return "no change\n"
    return "".join(difflib.unified_diff(a.ir_text.splitlines(True), b.ir_text.splitlines(True), a.label, b.label, n=1))


def render_diff(d: dict[str, Any], console=None) -> None:
    console = console or make_console()
    console.print(f"[bold]{d['a']}[/] ({d['a_stage']}) -> [bold]{d['b']}[/] ({d['b_stage']})")
    console.print(f"{len(d['added'])} added, {len(d['removed'])} removed, {len(d['changed'])} changed")
    for r in d["removed"]:
        console.print(f"[red]- %{r['name']}[/] {r['op']}", highlight=False)
    for r in d["added"]:
        src = f"  (from {', '.join(r['from'][:2])})" if r["from"] else ""
        console.print(f"[green]+ %{r['name']}[/] {r['op']}{src}", highlight=False)
    from rich.markup import escape

    for r in d["changed"]:
        console.print(f"[yellow]~ %{escape(r['name'])}[/]", highlight=False)
        for c in r.get("changes", []):
            console.print(f"    {escape(c['field'])}: {escape(c['text'])}", highlight=False)


def write_json(path: str, obj: Any) -> None:
    """Atomic JSON write: a temp file beside ``path``, renamed when complete."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise QpipeError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".qpipe-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
