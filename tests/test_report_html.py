"""report.html: written with every output folder, self-contained, with a no-overflow proof that holds.

The folder is the toy QuartzNet of conftest quantized once (about a second);
the chromium check runs only where chromium is installed.
"""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import FAST_PIPELINE, TinyASR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKER = os.path.join(ROOT, "tools", "check_report_html.py")
SECTIONS = ("summary", "pipeline", "graph", "per-layer", "sqnr", "saturation", "ranges", "weights", "accumulators", "wer", "layers")


def _checker():
    spec = importlib.util.spec_from_file_location("check_report_html", CHECKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    import qpipe.api as qp
    from qpipe.frontends.torch import from_module

    torch.manual_seed(0)
    fm = from_module(TinyASR().eval(), (torch.randn(2, 8, 32),))
    out = tmp_path_factory.mktemp("rep") / "out"
    result = qp.quantize(fm, passes=FAST_PIPELINE, output=str(out), progress=False)
    return result, str(out)


def _page(out: str) -> str:
    return open(os.path.join(out, "report.html"), encoding="utf-8").read()


def _meta(out: str) -> dict:
    return json.load(open(os.path.join(out, "qpipe.json"), encoding="utf-8"))


def test_folder_has_report_with_every_section(quantized):
    _, out = quantized
    page = _page(out)
    for sid in SECTIONS:
        assert f'id="{sid}"' in page, sid
    meta = _meta(out)
    for p in meta["passes"]:  # the pipeline table names every pass with its time
        assert f"<code>{p['step']}</code>" in page.replace("&#x27;", "'")
    names = [r["name"] for r in meta["layer_facts"]["integer_graph"]]
    assert all(f"%{n}" in page for n in names if n != "x")  # each integer node in the drawing's tooltips
    assert page.count("<svg") == 2  # before and after


def test_report_is_written_inside_the_atomic_write_and_names_out(quantized, tmp_path, monkeypatch):
    """report.html is in the temp folder before the rename, and the page names OUT, not the temp folder."""
    import qpipe.api as qp
    from qpipe.backends.folder import OutputSlot

    _, out = quantized
    assert "<title>qpipe report: out</title>" in _page(out) and ".qpipe-" not in _page(out).split("<h1>")[1][:200]
    seen = {}
    commit = OutputSlot.commit

    def spy(self):
        seen["files"] = sorted(os.listdir(self.tmp))
        return commit(self)

    monkeypatch.setattr(OutputSlot, "commit", spy)
    from qpipe.frontends.torch import from_module

    fm = from_module(TinyASR().eval(), (torch.randn(1, 8, 32),))
    qp.quantize(fm, passes=FAST_PIPELINE, output=str(tmp_path / "o2"), progress=False)
    assert "report.html" in seen["files"]


def test_report_is_self_contained_and_images_decode(quantized):
    from PIL import Image

    _, out = quantized
    page = _page(out)
    assert _checker().check_html(page) == []
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", page)
    imgs = re.findall(r'<img\b[^>]*\bsrc="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) == 3  # passes, per-layer panels, accumulators
    for b64 in imgs:
        with Image.open(io.BytesIO(base64.b64decode(b64, validate=True))) as img:
            img.load()  # decodes every pixel
            assert img.size[0] > 300 and img.size[1] > 150


def test_checker_flags_external_references():
    mod = _checker()
    assert mod.check_html('<img src="https://example.org/a.png">')
    assert mod.check_html('<a href="http://x">x</a>')
    assert mod.check_html('<img src="data:image/png;base64,AAAA">')  # not a PNG
    assert mod.check_html("<p>plain</p>") == []


def test_accumulator_proof_is_an_upper_bound_and_tight(quantized):
    """The recorded bound follows from K, max|x|, max|w|, max|b| of the real tensors; the per-channel
    bound is reached by an adversarial input, so it is no looser than it has to be."""
    from qpipe.ir.graph_utils import fetch_attr
    from qpipe.ir.opspec import spec_of
    from qpipe.ir.ops.conv import conv_accumulate

    result, out = quantized
    accs = _meta(out)["layer_facts"]["accumulators"]
    nodes = {n.name: n for n in result.gm.graph.nodes}
    assert len(accs) == 5  # dw, pw, conv2, res, head
    for name, a in accs.items():
        values = spec_of(nodes[name]).bind(nodes[name])
        w = fetch_attr(result.gm, values["w"].target).to(torch.int64)
        b = fetch_attr(result.gm, values["bias"].target).to(torch.int64) if values["bias"] is not None else torch.zeros(w.shape[0], dtype=torch.int64)
        groups = int(values["groups"])
        conv = getattr(TinyASR(), a["from"][0].split(":")[0])  # K from the float layer's own attributes
        assert a["k"] == conv.in_channels // conv.groups * conv.kernel_size[0]
        assert a["bound"] == a["k"] * a["x_abs_max"] * int(w.abs().max()) + int(b.abs().max())
        assert a["bound"] == a["recorded_bound"]  # the same bound the lowering chose its accumulator width from
        assert a["tight_bound"] <= a["bound"] <= a["limit"] == 2**31 - 1 and a["fits"]
        # an input at the clamp with the signs of the widest channel's weights reaches the per-channel bound
        c = int(((w.abs().reshape(w.shape[0], -1).sum(1)) * a["x_abs_max"] + b.abs()).argmax())
        sign = 1 if int(b[c]) >= 0 else -1
        k = w.shape[2]
        cin = w.shape[1] * groups
        x = torch.zeros(1, cin, k, dtype=torch.int64)
        g = c // (w.shape[0] // groups)
        x[0, g * w.shape[1]:(g + 1) * w.shape[1], :] = sign * torch.sign(w[c]) * a["x_abs_max"]
        acc = conv_accumulate(x, w, b, [1], [0], [1], groups)
        assert int(acc[0, c, 0].abs()) == a["tight_bound"]
        # and random inputs in range never exceed the bound
        xr = torch.randint(-a["x_abs_max"], a["x_abs_max"] + 1, (4, cin, 3 * k), generator=torch.Generator().manual_seed(1))
        assert int(conv_accumulate(xr, w, b, [1], [0], [1], groups).abs().max()) <= a["tight_bound"]


def test_proof_table_states_each_layer_with_margin(quantized):
    _, out = quantized
    page = _page(out)
    section = page[page.index('id="accumulators"'):page.index('id="wer"')]
    accs = _meta(out)["layer_facts"]["accumulators"]
    for name, a in accs.items():
        row = re.search(rf"<tr[^>]*><td class=l>%{name}</td>(.*?)</tr>", section).group(1)
        assert f"{a['bound']:,}" in row and f"{a['k']:,}" in row and f"{(2**31 - 1) // 1:,}" in row
        assert f"{(2**31 - 1) / a['bound']:,.0f}x" in row and row.endswith("<td class=l>yes</td>")
    assert "Proven: none of the 5 accumulators can overflow int32" in section


def test_overflowing_layer_is_flagged():
    from qpipe.inspect import GraphFacts, accumulator_rows
    from qpipe.report_facts import fmt_acc
    from qpipe.report_html import _accumulator_section

    rows = [{"name": "big", "op": "qpipe.conv1d_rq", "qparams": {"acc_bound": 3 * 2**30, "acc_bits": 32}},
            {"name": "wide", "op": "qpipe.conv1d_rq", "qparams": {"acc_bound": 3 * 2**30, "acc_bits": 64}},
            {"name": "ok", "op": "qpipe.conv1d_rq", "qparams": {"acc_bound": 1000, "acc_bits": 32}}]
    accs = accumulator_rows(GraphFacts("x", rows, "", {}, "integer"))
    assert [accs[n]["fits_int32"] for n in ("big", "wide", "ok")] == [False, False, True]
    assert [accs[n]["fits"] for n in ("big", "wide", "ok")] == [False, True, True]
    assert "OVERFLOW" in fmt_acc(accs["big"]) and "OVERFLOW" not in fmt_acc(accs["wide"])
    html = _accumulator_section(accs)
    assert "2 layers can exceed int32: big, wide" in html and "NO: OVERFLOW" in html and "int64 accumulator" in html
    assert "Proven" not in html


def _eval_result(out: str, wer: float) -> dict:
    model = {"name": "out", "path": out, "kind": "quantized", "wer": wer, "cer": 3.25, "delta_wer": 0.5, "rtf": 0.0123,
             "utterances": 7, "pipeline": "default", "target": "reference"}
    base = {"name": "float", "path": "m.nemo", "kind": "float", "wer": wer - 0.5, "cer": 3.0, "delta_wer": None,
            "rtf": 0.02, "utterances": 7}
    return {"manifest": "/data/test.json", "utterances": 7, "audio_seconds": 21.5, "normalization": "lowercase",
            "device": "cpu", "threads": 1, "models": [base, model], "per_utterance": []}


def test_report_cli_picks_up_eval_json_and_takes_given_ones(quantized, tmp_path, capsys):
    from qpipe.cli import main

    _, src = quantized
    out = str(tmp_path / "out")
    shutil.copytree(src, out)
    json.dump(_eval_result(out, 12.75), open(os.path.join(out, "eval.json"), "w"))
    other = tmp_path / "other.json"
    json.dump(_eval_result(out, 41.5), open(other, "w"))
    os.remove(os.path.join(out, "report.html"))
    assert main(["report", out]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {os.path.join(out, 'report.html')}"
    page = _page(out)
    wer = page[page.index('id="wer"'):page.index('id="layers"')]
    assert "12.75" in wer and "+0.50" in wer and "41.5" not in wer and "<tr class='me'>" in wer
    assert main(["report", out, "--eval", str(other), "-o", str(tmp_path / "r.html")]) == 0
    page2 = open(tmp_path / "r.html", encoding="utf-8").read()
    assert "12.75" in page2 and "41.50" in page2


@pytest.mark.parametrize("case", ["not-a-folder", "bad-eval", "eval-not-eval"])
def test_report_cli_bad_input_is_one_line(quantized, tmp_path, capsys, case):
    from qpipe.cli import main

    _, out = quantized
    bad = tmp_path / "bad.json"
    bad.write_text("{not json" if case == "bad-eval" else '{"a": 1}')
    argv = ["report", str(tmp_path)] if case == "not-a-folder" else ["report", out, "--eval", str(bad), "-o", str(tmp_path / "r.html")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qpipe: error: ") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "r.html").exists()


def test_report_failure_does_not_fail_quantization(tmp_path, monkeypatch, capsys, tiny_float_model):
    import qpipe.api as qp
    import qpipe.report_html as rh

    def broken(*a, **k):
        raise RuntimeError("plotting exploded")

    monkeypatch.setattr(rh, "build_html", broken)
    out = tmp_path / "out"
    result = qp.quantize(tiny_float_model, passes=FAST_PIPELINE, output=str(out), progress=False)
    assert result.output and os.path.isfile(out / "qpipe.json") and not os.path.exists(out / "report.html")
    err = capsys.readouterr().err
    assert "qpipe: warning: report.html not written: RuntimeError: plotting exploded" in err


def test_per_layer_sqnr_pairs_each_integer_tensor_with_its_float_value(quantized):
    from qpipe.report_facts import float_counterparts

    result, out = quantized
    pairs = float_counterparts(result.float_gm, result.gm)
    fops = {n.name: str(n.target) for n in result.float_gm.graph.nodes}
    # a ReLU folded into a requant clamp: the integer output stands for the float value after it
    from qpipe.ir.opspec import spec_of

    lo = {n.name: spec_of(n).bind(n)["lo"] for n in result.gm.graph.nodes if spec_of(n) is not None and spec_of(n).clamp}
    for name, fname in pairs.items():
        if lo.get(name) == 0:
            assert fops[fname] in ("aten.relu.default", "aten.dropout.default"), (name, fname)
    sq = _meta(out)["layer_facts"]["sqnr"]
    assert set(sq) == set(pairs)
    # a wrong pairing (pre- against post-ReLU) would be a few dB; the right one is far above
    assert all(isinstance(v["sqnr_db"], float) and v["sqnr_db"] > 20 for v in sq.values()), sq


def test_chromium_renders_the_report(quantized, tmp_path):
    mod = _checker()
    if mod.find_chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    _, out = quantized
    shot = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, CHECKER, os.path.join(out, "report.html"), "--screenshot", str(shot),
                           "--window-size", "1200,2400"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert mod.check_screenshot(str(shot), "1200,2400") == []


def test_cli_start_path_does_not_import_matplotlib():
    code = "import sys, qpipe.cli, qpipe.api, qpipe.inspect; print('matplotlib' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_folder_without_layer_facts_still_gets_a_report(quantized, tmp_path):
    """A folder written before layer_facts: the lowering's recorded bounds, the integer graph from ir.txt."""
    from qpipe.report_html import write_report

    _, src = quantized
    out = tmp_path / "old"
    shutil.copytree(src, out)
    meta = _meta(str(out))
    proofs = meta.pop("layer_facts")["accumulators"]
    json.dump(meta, open(out / "qpipe.json", "w"))
    page = open(write_report(str(out)), encoding="utf-8").read()
    assert _checker().check_html(page) == []
    assert "the float graph was not recorded" in page and "Per-layer SQNR was not recorded" in page
    assert page.count("<svg") == 1 and "ingredients not recorded" in page
    for name, a in proofs.items():
        assert f"<td class=l>%{name}</td>" in page and f"{a['bound']:,}" in page
