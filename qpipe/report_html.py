"""``OUT/report.html``: one self-contained page a person can look at (``qpipe report OUT``).

Everything comes from the folder: ``qpipe.json`` (passes and their times, the
node table with scales and saturation, ``layer_facts`` recorded at quantize time
by :mod:`qpipe.report_facts`: accumulator proofs, per-layer SQNR, both graphs),
``ir.txt`` (the integer graph's edges when ``layer_facts`` is missing), and any
``qpipe eval --json`` result given or lying in OUT (the WER table).

Plots are matplotlib PNGs inlined as base64, the graphs inline SVG; the page
loads nothing (no http(s) links, no external files). matplotlib is imported only
here, with the Agg backend, so the CLI's start path does not pay for it.
"""
from __future__ import annotations

import base64
import glob
import html
import io
import json
import math
import os
import re
import sys
import tempfile
from typing import Any, Optional, Sequence

from qpipe.report_facts import accumulator_table
from qpipe.ir.errors import QpipeError

REPORT_NAME = "report.html"

# ----------------------------------------------------------------------------- data


def _is_eval_result(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("models"), list) and "manifest" in obj


def read_eval(path: str) -> dict[str, Any]:
    """A ``qpipe eval --json`` result, checked to be one."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise QpipeError(f"no such eval result: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QpipeError(f"cannot read eval result {path}: {exc}") from None
    if not _is_eval_result(obj):
        raise QpipeError(f"{path} is not a qpipe eval --json result (no 'models' and 'manifest')")
    return obj


def eval_results_in(out_dir: str) -> list[str]:
    """The ``qpipe eval --json`` files written into OUT (any ``*.json`` but qpipe.json that is one)."""
    found = []
    for path in sorted(glob.glob(os.path.join(out_dir, "*.json"))):
        if os.path.basename(path) == "qpipe.json":
            continue
        try:
            with open(path, encoding="utf-8") as f:
                if _is_eval_result(json.load(f)):
                    found.append(path)
        except (OSError, UnicodeDecodeError, ValueError):
            continue
    return found


def _short_op(op: str) -> str:
    op = op.replace("qpipe.", "").replace("aten.", "")
    return re.sub(r"\.(default|Tensor|int)$", "", op)


def _family(op: str) -> str:
    o = _short_op(op)
    for key, fam in (("conv", "conv"), ("linear", "conv"), ("matmul", "conv"), ("batch_norm", "norm"),
                     ("layer_norm", "norm"), ("norm", "norm"), ("add", "add"), ("mul", "add"), ("dropout", "drop"),
                     ("quantize", "quant"), ("input", "input")):
        if key in o:
            return fam
    if o in ("relu", "hardtanh", "clamp", "gelu", "silu", "sigmoid", "tanh", "softmax", "log_softmax") or "softmax" in o:
        return "act"
    return "other"


_COLORS = {"conv": "#4c78a8", "norm": "#f58518", "act": "#54a24b", "drop": "#bab0ac", "add": "#b279a2",
           "quant": "#e45756", "input": "#72b7b2", "other": "#9d755d"}


def _layers(meta: dict[str, Any], lf: dict[str, Any]) -> list[dict[str, Any]]:
    """The integer tensors the plots show (in graph order): scales, saturation, ranges, SQNR."""
    sq = lf.get("sqnr") or {}
    out = []
    for row in meta.get("nodes", []):
        q = row.get("qparams") or {}
        scale = q.get("out_scale", q.get("scale"))
        if not isinstance(scale, (int, float)):
            continue
        bits = q.get("bits", 8)
        hi = q.get("hi", (1 << (int(bits) - 1)) - 1)
        lo = q.get("lo", -hi)
        w = q.get("w_scale")
        s = (sq.get(row["name"]) or {}).get("sqnr_db")
        out.append({
            "name": row["name"],
            "op": row.get("op", ""),
            "bits": bits,
            "scale": float(scale),
            "range": (float(lo) * scale, float(hi) * scale),
            "amax": q.get("amax"),
            "saturation": q.get("saturation"),
            "w_scale": [x for x in w if isinstance(x, (int, float))] if isinstance(w, list) else None,
            "sqnr": math.inf if s == "inf" else s,
            "from": (row.get("from") or [""])[0],
        })
    return out


_OPERAND = re.compile(r"%([\w.]+)")


def _graph_from_ir(ir_text: str) -> list[dict[str, Any]]:
    """The integer graph's rows from ``ir.txt`` (a folder written before layer_facts existed)."""
    rows, names = [], set()
    for line in ir_text.splitlines():
        m = re.match(r"^%([\w.]+) = ([^\s(]+)(.*)$", line)
        if not m or m.group(2).startswith("get_attr"):
            continue
        args = m.group(3).split(" {")[0].split(" : ")[0]
        inputs = [n for n in _OPERAND.findall(args) if n in names]
        names.add(m.group(1))
        rows.append({"name": m.group(1), "op": m.group(2), "shape": None, "inputs": inputs})
    return rows


# ----------------------------------------------------------------------------- drawing


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "figure.dpi": 100, "svg.hashsalt": "qpipe"})
    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # fixed margins: one draw, no tight-bbox pass
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _layer_axis(ax, layers: list[dict[str, Any]]) -> None:
    ax.set_xlim(-0.6, len(layers) - 0.4)
    step = max(1, len(layers) // 40)
    ticks = list(range(0, len(layers), step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([layers[i]["name"] for i in ticks], rotation=70, ha="right", fontsize=6)
    ax.grid(axis="y", alpha=0.3)


def _fig_width(n: int) -> float:
    return min(16.0, max(7.0, 0.2 * n + 2))


def plot_passes(passes: list[dict[str, Any]]) -> str:
    plt = _plt()
    names = [p.get("name") or p.get("step") for p in passes]  # the table has the full step with its options
    sec = [float(p.get("seconds") or 0) for p in passes]
    ver = [float(p.get("verify_seconds") or 0) for p in passes]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(passes) + 0.9))
    fig.subplots_adjust(left=0.28, right=0.98, top=1 - 0.3 / (0.35 * len(passes) + 0.9), bottom=0.5 / (0.35 * len(passes) + 0.9))
    y = list(range(len(passes)))[::-1]
    ax.barh(y, sec, color="#4c78a8", label="pass")
    ax.barh(y, ver, left=sec, color="#f58518", label="verifier")
    ax.set_yticks(y)
    ax.set_yticklabels(names)
    ax.set_xlabel("seconds")
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("time per pass (verifier after each pass stacked)")
    return _png(fig)


def plot_layers(layers: list[dict[str, Any]]) -> str:
    """One figure, four panels on a shared layer axis: SQNR vs float, saturation, activation ranges, weight scales."""
    plt = _plt()
    n = len(layers)
    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(_fig_width(n), 9.2))
    fig.subplots_adjust(left=0.07, right=0.99, top=0.97, bottom=0.16, hspace=0.28)
    x = list(range(n))
    colors = [_COLORS[_family(l["op"])] for l in layers]
    ax = axes[0]
    pts = [(i, l["sqnr"]) for i, l in enumerate(layers) if isinstance(l["sqnr"], (int, float)) and math.isfinite(l["sqnr"])]
    if pts:
        ax.plot([i for i, _ in pts], [v for _, v in pts], color="#888", lw=0.8, zorder=1)
        ax.scatter([i for i, _ in pts], [v for _, v in pts], c=[colors[i] for i, _ in pts], s=14, zorder=2)
    else:
        ax.text(0.5, 0.5, "per-layer SQNR not recorded in this folder", transform=ax.transAxes, ha="center")
    ax.set_ylabel("SQNR vs float (dB)")
    ax.set_title("1  SQNR of each integer tensor (dequantized) against the float model, cumulative", loc="left")
    ax = axes[1]
    sat = [l["saturation"] * 100 if isinstance(l["saturation"], (int, float)) else 0.0 for l in layers]
    ax.bar(x, sat, color=colors)
    ax.set_ylabel("saturated %")
    ax.set_title("2  saturation share: % of calibration values clipped by the chosen range", loc="left")
    ax = axes[2]
    lo = [l["range"][0] for l in layers]
    hi = [l["range"][1] for l in layers]
    ax.bar(x, [h - l for l, h in zip(lo, hi)], bottom=lo, color="#c6dbef", edgecolor="#4c78a8", lw=0.5,
           label="representable: [lo, hi] x scale")
    amax = [(i, l["amax"]) for i, l in enumerate(layers) if isinstance(l["amax"], (int, float))]
    if amax:
        ax.scatter([i for i, _ in amax], [a for _, a in amax], marker="_", s=60, color="#e45756", label="observed max |x|")
    ax.axhline(0, color="#444", lw=0.5)
    ax.set_ylabel("real value")
    ax.set_title("3  activation ranges: what each integer tensor can hold, and the calibration's observed maximum", loc="left")
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax = axes[3]
    wl = [(i, l["w_scale"]) for i, l in enumerate(layers) if l["w_scale"]]
    if wl:
        ax.boxplot([w for _, w in wl], positions=[i for i, _ in wl], widths=0.6, manage_ticks=False,
                   flierprops={"markersize": 2, "alpha": 0.5}, medianprops={"color": "#e45756"})
        ax.set_yscale("log")
    ax.set_ylabel("weight scale")
    ax.set_title("4  per-channel weight scales (box: quartiles, whiskers 1.5 IQR, dots: outliers)", loc="left")
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    _layer_axis(axes[3], layers)
    return _png(fig)


def plot_accumulators(names: list[str], accs: dict[str, dict[str, Any]]) -> Optional[str]:
    if not names:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(_fig_width(len(names)), 3.4))
    fig.subplots_adjust(left=0.07, right=0.99, top=0.92, bottom=0.3)
    bounds = [max(1, int(accs[n]["bound"])) for n in names]
    ax.bar(range(len(names)), bounds, color=["#4c78a8" if accs[n]["fits_int32"] else "#e45756" for n in names],
           label="|acc| bound: K max|x| max|w| + max|b|")
    ax.axhline((1 << 31) - 1, color="#e45756", ls="--", lw=1, label="int32 limit 2^31-1")
    from matplotlib.ticker import LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.set_ylim(bottom=min(bounds) / 3, top=2 ** 33)
    ax.yaxis.set_major_locator(LogLocator(base=10))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("accumulator magnitude")
    ax.set_title("accumulator bound per layer against the int32 limit (log scale)")
    ax.legend(fontsize=7, loc="center left")
    _layer_axis(ax, [{"name": n} for n in names])
    return _png(fig)


def graph_svg(rows: list[dict[str, Any]], per_row: int = 16, title: str = "") -> str:
    """The layer chain as boxes in reading order; an edge between neighbours is a line, any other an arc."""
    if not rows:
        return "<p class=note>no graph recorded</p>"
    bw, bh, gx, gy, pad = 64, 24, 16, 46, 18
    pos = {}
    for i, r in enumerate(rows):
        row, col = divmod(i, per_row)
        pos[r["name"]] = (pad + col * (bw + gx), pad + 12 + row * (bh + gy), i)
    width = pad * 2 + min(len(rows), per_row) * (bw + gx) - gx
    height = pad * 2 + 12 + ((len(rows) - 1) // per_row + 1) * (bh + gy) - gy
    parts = [f'<svg class="graph" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
             f'role="img" aria-label="{html.escape(title)}">']
    parts.append('<defs><marker id="arr" viewBox="0 0 6 6" refX="6" refY="3" markerWidth="5" markerHeight="5" '
                 'orient="auto"><path d="M0,0 L6,3 L0,6 z" fill="#666"/></marker></defs>')
    for r in rows:
        x1, y1, i1 = pos[r["name"]]
        for src in r.get("inputs", []):
            if src not in pos:
                continue
            x0, y0, i0 = pos[src]
            if i1 == i0 + 1 and y0 == y1:
                parts.append(f'<line x1="{x0 + bw}" y1="{y0 + bh / 2}" x2="{x1}" y2="{y1 + bh / 2}" stroke="#666" '
                             'stroke-width="1" marker-end="url(#arr)"/>')
            elif y0 == y1:
                h = min(14, 4 + 2 * (i1 - i0))
                parts.append(f'<path d="M{x0 + bw / 2},{y0} C{x0 + bw / 2},{y0 - h} {x1 + bw / 2},{y1 - h} {x1 + bw / 2},{y1}" '
                             'fill="none" stroke="#b279a2" stroke-width="1.2" marker-end="url(#arr)"/>')
            else:  # to a later row: leave from the bottom, enter at the top
                parts.append(f'<path d="M{x0 + bw / 2},{y0 + bh} C{x0 + bw / 2},{y0 + bh + gy / 2} {x1 + bw / 2},{y1 - gy / 2} '
                             f'{x1 + bw / 2},{y1}" fill="none" stroke="{"#999" if i1 == i0 + 1 else "#b279a2"}" '
                             'stroke-width="0.8" stroke-dasharray="3,2" marker-end="url(#arr)"/>')
    for r in rows:
        x, y, _ = pos[r["name"]]
        fam = _family(r["op"])
        label = _short_op(r["op"])[:11]
        tip = f'%{r["name"]} = {r["op"]}' + (f' : [{",".join(r["shape"])}]' if r.get("shape") else "")
        parts.append(f'<g><title>{html.escape(tip)}</title><rect x="{x}" y="{y}" width="{bw}" height="{bh}" rx="4" '
                     f'fill="{_COLORS[fam]}"/><text x="{x + bw / 2}" y="{y + bh / 2 + 3}" text-anchor="middle" '
                     f'font-size="9" fill="#fff" font-family="sans-serif">{html.escape(label)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _legend() -> str:
    names = {"conv": "conv / linear", "norm": "batch norm", "act": "activation", "drop": "dropout", "add": "add",
             "quant": "quantize", "input": "input", "other": "layout / other"}
    return "<p class=legend>" + " ".join(f'<span style="background:{_COLORS[k]}"></span>{v}' for k, v in names.items()) + "</p>"


def _op_counts(rows: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[_short_op(r["op"])] = counts.get(_short_op(r["op"]), 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda t: -t[1]))


# ----------------------------------------------------------------------------- page

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1320px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h3{font-size:14px;margin:14px 0 4px}h2{font-size:17px;margin-top:30px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:12px;margin:8px 0}th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}td.wrap{text-align:left;max-width:560px;word-break:break-all}tr.bad td{background:#fde0dd}tr.me td{background:#eef6ff}
.note{color:#555;font-size:13px}.ok{color:#1a7f37;font-weight:600}.fail{color:#c62828;font-weight:600}
img{max-width:100%;display:block;margin:6px 0}.graph{max-width:100%;height:auto;display:block;margin:6px 0}
.legend span{display:inline-block;width:11px;height:11px;margin:0 4px 0 12px;border-radius:2px;vertical-align:middle}
.legend{font-size:12px}.anchors{font-size:12px;color:#555}.anchors h3{display:inline;font-size:12px;font-weight:normal;color:#555;margin-right:14px}code{font-size:12px;background:#f5f5f5;padding:1px 3px}.kv td{text-align:left}
details{margin:8px 0}summary{cursor:pointer;font-size:13px}
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return ""
    if isinstance(v, float) and not math.isfinite(v):
        return "inf"
    return format(v, spec) if isinstance(v, (int, float)) else _e(v)


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_e(title)}</h2>{body}</section>'


def _summary(meta: dict[str, Any], accs: dict[str, dict[str, Any]], out_dir: str) -> str:
    m = meta.get("metrics") or {}
    src = meta.get("source") or {}
    rows = [("folder", out_dir), ("model", f"{src.get('path') or '?'} ({src.get('kind') or '?'})"),
            ("target", meta.get("target", "reference")), ("written", meta.get("created", "")),
            ("pipeline", meta.get("pipeline", "")),
            ("versions", ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items()))]
    if "float_mb" in m:
        rows.append(("weights + constants", f"{m['float_mb']} MB float -> {m.get('final_mb')} MB"))
    if "logprob_sqnr_db" in m:
        rows.append(("output on the calibration inputs",
                     f"log-prob SQNR {m['logprob_sqnr_db']} dB vs float, argmax agreement {m.get('argmax_agreement', 0) * 100:.2f}%"))
    if accs:
        worst = min(accs, key=lambda n: accs[n]["margin"])
        over = [n for n, a in accs.items() if not a["fits_int32"]]
        if over:
            verdict = f'<span class=fail>{len(over)} of {len(accs)} accumulators need more than int32</span>'
        else:
            verdict = (f'<span class=ok>no accumulator overflows int32</span> ({len(accs)} layers; '
                       f'smallest margin {accs[worst]["margin"]:.0f}x at %{_e(worst)})')
        rows.append(("accumulators", verdict))
    body = "<table class=kv>" + "".join(
        f"<tr><th class=l>{_e(k)}</th><td class=l>{v if k == 'accumulators' else _e(v)}</td></tr>" for k, v in rows) + "</table>"
    return body


def _pipeline(meta: dict[str, Any]) -> str:
    passes = meta.get("passes") or []
    if not passes:
        return "<p class=note>no passes recorded</p>"
    head = "<tr><th class=l>#</th><th class=l>pass</th><th>seconds</th><th>verify s</th><th class=l>changed</th><th class=l>stats</th></tr>"
    body = "".join(
        f"<tr><td class=l>{i + 1}</td><td class=l><code>{_e(p.get('step') or p.get('name'))}</code></td>"
        f"<td>{_fmt(p.get('seconds'), '.3f')}</td><td>{_fmt(p.get('verify_seconds'), '.3f')}</td>"
        f"<td class=l>{'yes' if p.get('modified') else 'no'}</td>"
        f"<td class=l>{_e(' '.join(f'{k}={v}' for k, v in (p.get('stats') or {}).items()))}</td></tr>"
        for i, p in enumerate(passes))
    total = sum(float(p.get("seconds") or 0) + float(p.get("verify_seconds") or 0) for p in passes)
    m = meta.get("metrics") or {}
    note = f"<p class=note>pipeline {total:.2f} s in all"
    if "load_seconds" in m:
        note += f"; loading and exporting the model {m['load_seconds']} s before it"
    note += "</p>"
    return f"<table>{head}{body}</table>{note}" + _img(plot_passes(passes), "time per pass")


def _graphs(meta: dict[str, Any], lf: dict[str, Any], ir_text: str) -> str:
    before = lf.get("float_graph") or []
    after = lf.get("integer_graph") or _graph_from_ir(ir_text)
    out = _legend()
    out += (f"<h3>before: the float graph ({len(before)} nodes: {_e(_op_counts(before))})</h3>" + graph_svg(before, title="float graph")
            if before else "<p class=note>before: the float graph was not recorded in this folder (written before qpipe recorded layer_facts)</p>")
    out += f"<h3>after: the integer graph ({len(after)} nodes: {_e(_op_counts(after))})</h3>" + graph_svg(after, title="integer graph")
    out += "<p class=note>Boxes in graph order, left to right; an arc is an edge that skips ahead (a residual), a dashed line continues on the next row. Hover a box for its node, op and shape.</p>"
    return out


def _accumulator_section(accs: dict[str, dict[str, Any]]) -> str:
    names = list(accs)
    if not names:
        return "<p class=note>no weighted integer layers</p>"
    proof = [n for n in names if accs[n]["source"] == "proof"]
    intro = ("<p>Each output of a convolution or linear layer is an integer sum of K products x&middot;w plus an integer bias, so "
             "<b>|acc| &le; K &middot; max|x| &middot; max|w| + max|b|</b>, with K = C_in/groups &times; kernel size for a "
             "convolution and in_features for a linear layer. max|x| is the clamp of the op that produces the input "
             "(every requantize and the input quantizer clamp to [lo, hi]; without one, the bit width 2<sup>b-1</sup>); "
             "max|w| and max|b| are read from the quantized weight and bias tensors. When the bound is at most "
             "2<sup>31</sup>&minus;1 the int32 accumulator cannot overflow for <i>any</i> input, not only the calibration data. "
             "Margin = limit / bound; headroom = log2 of it, in bits. The per-channel bound "
             "max<sub>c</sub>(&Sigma;|w<sub>c</sub>|&middot;max|x| + |b<sub>c</sub>|) is tighter still.</p>")
    plot = plot_accumulators(names, accs)
    head = ("<tr><th class=l>layer</th><th class=l>op</th><th>K</th><th class=l>K =</th><th>max|x|</th><th class=l>max|x| from</th>"
            "<th>max|w|</th><th>max|b|</th><th>bound</th><th>per-channel bound</th><th>int32 limit</th><th>margin</th>"
            "<th>headroom bits</th><th class=l>fits int32</th></tr>")
    rows = []
    for n in names:
        a = accs[n]
        full = a["source"] == "proof"
        ok = a["fits_int32"]
        cells = [f"<td class=l>%{_e(n)}</td>", f"<td class=l>{_e(_short_op(a.get('op', '')))}</td>"]
        if full:
            cells += [f"<td>{a['k']:,}</td>", f"<td class=l>{_e(a['k_formula'])}</td>", f"<td>{a['x_abs_max']}</td>",
                      f"<td class=l>{_e(a['x_why'])}</td>", f"<td>{a['w_abs_max']}</td>", f"<td>{a['b_abs_max']:,}</td>"]
        else:
            cells += ["<td colspan=6 class=l>ingredients not recorded; the lowering's bound</td>"]
        cells += [f"<td>{int(a['bound']):,}</td>", f"<td>{int(a['tight_bound']):,}</td>" if full else "<td></td>",
                  f"<td>{a['int32_limit']:,}</td>", f"<td>{a['int32_limit'] / max(1, int(a['bound'])):,.0f}x</td>",
                  f"<td>{math.log2(a['int32_limit'] / max(1, int(a['bound']))):.1f}</td>",
                  f"<td class=l>{'yes' if ok else ('no: int' + str(a['acc_bits']) + ' accumulator' if a['fits'] else 'NO: OVERFLOW')}</td>"]
        rows.append(f"<tr class='{'' if ok else 'bad'}'>{''.join(cells)}</tr>")
    note = ""
    if len(proof) < len(names):
        note = (f"<p class=note>{len(names) - len(proof)} layers show only the bound the lowering recorded "
                "(K &middot; 127 &middot; 127 + max|b|): this folder was written before qpipe recorded the proof's ingredients.</p>")
    worst = min(names, key=lambda n: accs[n]["int32_limit"] / max(1, int(accs[n]["bound"])))
    over = [n for n in names if not accs[n]["fits_int32"]]
    verdict = (f"<p class=fail>{len(over)} layers can exceed int32: {_e(', '.join(over))}</p>" if over else
               f"<p class=ok>Proven: none of the {len(names)} accumulators can overflow int32; the tightest is %{_e(worst)} "
               f"with bound {int(accs[worst]['bound']):,} ({accs[worst]['int32_limit'] / max(1, int(accs[worst]['bound'])):,.0f}x below 2^31-1).</p>")
    return intro + verdict + (_img(plot, "accumulator bounds") if plot else "") + f"<table>{head}{''.join(rows)}</table>" + note


def _layer_table(layers: list[dict[str, Any]], accs: dict[str, dict[str, Any]]) -> str:
    head = ("<tr><th class=l>layer</th><th class=l>op</th><th>bits</th><th>scale</th><th>range</th><th>observed max|x|</th>"
            "<th>saturated %</th><th>SQNR dB</th><th>w scale min..max</th><th>acc bound</th><th class=l>from</th></tr>")
    rows = []
    for l in layers:
        w = l["w_scale"]
        a = accs.get(l["name"])
        rows.append(
            f"<tr><td class=l>%{_e(l['name'])}</td><td class=l>{_e(_short_op(l['op']))}</td><td>{_e(l['bits'])}</td>"
            f"<td>{l['scale']:.4g}</td><td>[{l['range'][0]:.3g}, {l['range'][1]:.3g}]</td><td>{_fmt(l['amax'], '.3g')}</td>"
            f"<td>{_fmt(l['saturation'] * 100, '.4f') if isinstance(l['saturation'], (int, float)) else ''}</td>"
            f"<td>{_fmt(l['sqnr'])}</td><td>{f'{min(w):.3g}..{max(w):.3g}' if w else ''}</td>"
            f"<td>{format(int(a['bound']), ',') if a else ''}</td>"
            f"<td class=l>{_e(l['from'])}</td></tr>")
    return f"<details open><summary>all {len(layers)} integer tensors</summary><table>{head}{''.join(rows)}</table></details>"


def _wer_section(evals: list[tuple[str, dict[str, Any]]], out_dir: str) -> str:
    parts = []
    me = os.path.realpath(out_dir)
    for path, r in evals:
        has_float = any(m.get("kind") == "float" for m in r["models"])
        head = ("<tr><th class=l>model</th><th class=l>kind</th><th>WER %</th><th>CER %</th>"
                + ("<th>&Delta;WER (points)</th>" if has_float else "") + "<th>RTF</th><th>utterances</th><th class=l>pipeline / target</th></tr>")
        rows = []
        for m in r["models"]:
            mine = m.get("path") and os.path.realpath(str(m["path"])) == me
            cells = [f"<td class=l>{_e(m.get('name'))}</td>", f"<td class=l>{_e(m.get('kind'))}</td>",
                     f"<td>{_fmt(m.get('wer'))}</td>", f"<td>{_fmt(m.get('cer'))}</td>"]
            if has_float:
                d = m.get("delta_wer")
                cells.append(f"<td>{'' if d is None else f'{d:+.2f}'}</td>")
            cells += [f"<td>{_fmt(m.get('rtf'), '.4f')}</td>", f"<td>{_e(m.get('utterances', ''))}</td>",
                      f"<td class=wrap>{_e(' / '.join(str(x) for x in (m.get('pipeline'), m.get('target')) if x))}</td>"]
            rows.append(f"<tr class='{'me' if mine else ''}'>{''.join(cells)}</tr>")
        dec = r.get("decoding") or {"method": "greedy"}
        parts.append(
            f"<p class=note>{_e(os.path.basename(path))}: manifest <code>{_e(r.get('manifest'))}</code>, "
            f"{_e(r.get('utterances'))} utterances, {_fmt(r.get('audio_seconds'), '.1f')} s of audio; decoding {_e(dec.get('method'))}; "
            f"text normalization: {_e(r.get('normalization', ''))}; RTF on {_e(r.get('device', '?'))}, {_e(r.get('threads', '?'))} threads. "
            "The row of this folder is highlighted.</p>"
            f"<table>{head}{''.join(rows)}</table>")
    return "".join(parts)


def build_html(out_dir: str, eval_paths: Sequence[str] = (), shown_as: Optional[str] = None) -> str:
    """The page for output folder ``out_dir`` (and the eval results given, plus those in it).

    ``shown_as``: the folder's name on the page when ``out_dir`` is the temp folder
    it is being written in (the page is part of OUT's atomic write).
    """
    from qpipe.backends.folder import read_meta

    shown = shown_as or out_dir
    meta = read_meta(out_dir)
    ir_path = os.path.join(out_dir, "ir.txt")
    ir_text = open(ir_path, encoding="utf-8").read() if os.path.isfile(ir_path) else ""
    lf = meta.get("layer_facts") or {}
    accs = accumulator_table(meta.get("nodes", []), lf)
    layers = _layers(meta, lf)
    paths = list(dict.fromkeys([*map(os.path.abspath, eval_paths), *map(os.path.abspath, eval_results_in(out_dir))]))
    evals = [(p, read_eval(p)) for p in paths]

    sections = [_section("summary", "Summary", _summary(meta, accs, shown)),
                _section("pipeline", "Pipeline and per-pass timings", _pipeline(meta)),
                _section("graph", "Graph before and after", _graphs(meta, lf, ir_text))]
    note = ""
    if lf.get("sqnr_input_shape"):
        note = (f" SQNR is on the first calibration batch {_e(lf['sqnr_input_shape'])}; the integer graph runs on its own "
                "integer values, so each point includes the error of every layer before it.")
    elif not lf.get("sqnr"):
        note = " Per-layer SQNR was not recorded in this folder (written before qpipe recorded layer_facts); quantize again to get it."
    anchors = "".join(f'<h3 id="{sid}">{i}. {_e(t)}</h3>' for i, (sid, t) in enumerate(
        [("sqnr", "SQNR against the float model"), ("saturation", "saturation share"),
         ("ranges", "activation ranges"), ("weights", "weight scales")], 1))
    body = (f"<p class=note>One integer tensor per column, in graph order; color = op family as in the graph above.{note}</p>"
            + f"<div class=anchors>panels: {anchors}</div>"
            + (_img(plot_layers(layers), "per-layer SQNR, saturation, activation ranges, weight scales") if layers else ""))
    sections.append(_section("per-layer", "Per-layer plots: SQNR, saturation, activation ranges, weight scales", body))
    sections.append(_section("accumulators", "Accumulator bounds: no int32 overflow", _accumulator_section(accs)))
    if evals:
        sections.append(_section("wer", "WER (qpipe eval)", _wer_section(evals, shown)))
    else:
        sections.append(_section("wer", "WER (qpipe eval)", "<p class=note>no eval result: run <code>qpipe eval MODEL.nemo OUT --manifest M.json --json OUT/eval.json</code>, then <code>qpipe report OUT</code></p>"))
    sections.append(_section("layers", "Per-layer table", _layer_table(layers, accs)))
    title = f"qpipe report: {os.path.basename(os.path.abspath(shown))}"
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title><style>{_CSS}</style></head>"
            f"<body><h1>{_e(title)}</h1>{''.join(sections)}</body></html>\n")


def write_report(out_dir: str, eval_paths: Sequence[str] = (), output: Optional[str] = None,
                 shown_as: Optional[str] = None) -> str:
    """Write ``OUT/report.html`` (or ``output``) atomically; returns its path."""
    page = build_html(out_dir, eval_paths, shown_as)
    path = os.path.abspath(output or os.path.join(out_dir, REPORT_NAME))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise QpipeError(f"cannot write {path}: folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".qpipe-report-", suffix=".html", dir=folder)
    except OSError as exc:
        raise QpipeError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_report_quietly(out_dir: str, shown_as: Optional[str] = None) -> Optional[str]:
    """For the quantize hook: a failure is one warning line on stderr, never a failed quantization."""
    try:
        return write_report(out_dir, shown_as=shown_as)
    except Exception as exc:  # noqa: BLE001 - the model is written; the page is a convenience
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"qpipe: warning: {REPORT_NAME} not written: {type(exc).__name__}: {first}", file=sys.stderr)
        return None
