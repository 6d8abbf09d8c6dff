"""qpipe inspect shows the accumulator bounds of report.html; qpipe diff shows old -> new values."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import FAST_PIPELINE, TinyASR


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import qpipe.api as qp
    from qpipe.frontends.torch import from_module

    torch.manual_seed(0)
    fm = from_module(TinyASR().eval(), (torch.randn(2, 8, 32),))
    out = tmp_path_factory.mktemp("insp") / "out"
    qp.quantize(fm, passes=FAST_PIPELINE, output=str(out), progress=False)
    return str(out)


def _console():
    from rich.console import Console

    return Console(record=True, width=400, color_system=None)


def test_inspect_shows_the_report_accumulator_bounds(folder):
    from qpipe.inspect import facts_from_path, inspect_json, render_inspect

    facts = facts_from_path(folder)
    console = _console()
    render_inspect(facts, console)
    text = console.export_text()
    proofs = json.load(open(os.path.join(folder, "qpipe.json")))["layer_facts"]["accumulators"]
    assert "acc bound" in text and len(proofs) == 5
    for name, a in proofs.items():
        line = next(l for l in text.splitlines() if f" {name} " in f" {l} ")
        assert f"{a['bound']:,} <= 2^31-1 ({(2**31 - 1) / a['bound']:.0f}x)" in line
    worst = min(proofs, key=lambda n: (2**31 - 1) / proofs[n]["bound"])
    assert f"all 5 accumulators fit their signed limit; smallest margin {(2**31 - 1) / proofs[worst]['bound']:.0f}x at %{worst}" in text
    layers = {r["node"]: r for r in inspect_json(facts)["layers"]}
    assert all(layers[n]["acc_bound"] == a["bound"] for n, a in proofs.items())


def test_ir_dump_gives_the_same_bounds_as_the_proof(folder):
    """An IR dump carries only the lowering's acc_bound; it agrees with the proof's K*max|x|*max|w|+max|b|."""
    from qpipe.inspect import accumulator_rows, facts_from_path

    proofs = json.load(open(os.path.join(folder, "qpipe.json")))["layer_facts"]["accumulators"]
    dump = accumulator_rows(facts_from_path(os.path.join(folder, "ir.txt")))
    assert {n: r["bound"] for n, r in dump.items()} == {n: a["bound"] for n, a in proofs.items()}
    assert all(r["source"] == "recorded" and r["fits_int32"] for r in dump.values())


def test_diff_shows_old_and_new_values(folder, tmp_path):
    from qpipe.cli import main
    from qpipe.inspect import diff_facts, facts_from_path, render_diff

    other = tmp_path / "other"
    shutil.copytree(folder, other)
    meta = json.load(open(other / "qpipe.json"))
    node = next(r for r in meta["nodes"] if r["op"] == "qpipe.conv1d_rq" and len(r["qparams"]["w_scale"]) >= 8)
    old_scale, old_w, old_shape = node["qparams"]["out_scale"], list(node["qparams"]["w_scale"]), list(node["shape"])
    node["qparams"]["out_scale"] = old_scale * 1.25
    node["qparams"]["w_scale"][3] = old_w[3] * 2
    node["qparams"]["bits"] = 6
    node["shape"] = ["B", "99", "T"]
    json.dump(meta, open(other / "qpipe.json", "w"))

    d = diff_facts(facts_from_path(folder), facts_from_path(str(other)))
    (changed,) = d["changed"]
    assert changed["name"] == node["name"]
    by_field = {c["field"]: c for c in changed["changes"]}
    assert set(by_field) == {"qparams.out_scale", "qparams.w_scale", "qparams.bits", "shape"}
    assert by_field["qparams.out_scale"]["text"] == f"{old_scale:.6g} -> {old_scale * 1.25:.6g} (+25%)"
    assert by_field["qparams.bits"]["text"] == "8 -> 6 (-25%)"
    assert by_field["qparams.w_scale"]["text"].startswith(f"1 of {len(old_w)} changed, largest [3] {old_w[3]:.6g} -> {old_w[3] * 2:.6g} (+100%)")
    assert by_field["shape"]["text"] == f"[{','.join(old_shape)}] -> [B,99,T]"
    console = _console()
    render_diff(d, console)
    text = console.export_text()
    assert f"qparams.out_scale: {old_scale:.6g} -> {old_scale * 1.25:.6g}" in text and "qparams changed" not in text
    assert main(["diff", folder, folder]) == 0  # the same folder: nothing changed


def test_diff_of_identical_folders_lists_no_changes(folder):
    from qpipe.inspect import diff_facts, facts_from_path

    d = diff_facts(facts_from_path(folder), facts_from_path(folder))
    assert d["changed"] == [] and d["added"] == [] and d["removed"] == []
