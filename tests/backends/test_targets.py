"""Targets: the registry, the shared output folder, the reference target, the CLI's --target."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import FAST_PIPELINE, ROOT
from qpipe.api import quantize
from qpipe.backends import (
    QuantizedModel,
    Runner,
    Target,
    get_target,
    list_targets,
    open_folder,
    read_meta,
    register_target,
)
from qpipe.backends.reference import ReferenceTarget, export_integer
from qpipe.ir.errors import QpipeError

QPIPE = [sys.executable, os.path.join(ROOT, "tools", "qpipe")]


class _Unavailable(Target):
    name = "unavailable-for-test"
    summary = "a target this machine lacks"

    def available(self):
        return False, "needs the moon (pip install moon)"

    def write(self, folder, gm, record, example):  # pragma: no cover - never reached
        raise AssertionError("write must not be called")

    def load(self, folder, meta):  # pragma: no cover
        raise AssertionError("load must not be called")


@register_target
class _ProgramElsewhere(Target):
    """A second target through the same seam: the reference program under another file name."""

    name = "program-elsewhere-for-test"
    summary = "the torch.export program as program.pt2"
    files = ("program.pt2",)

    def write(self, folder, gm, record, example):
        torch.export.save(export_integer(gm, example, record.time_dim), os.path.join(folder, "program.pt2"))

    def load(self, folder, meta):
        module = torch.export.load(os.path.join(folder, "program.pt2")).module()

        class _R:
            def logits_int(self, features):
                return module(features)

        return _R()


register_target(_Unavailable())


@pytest.fixture(scope="module")
def _written_once(tmp_path_factory):
    from conftest import TinyASR
    from qpipe.frontends.torch import from_module

    torch.manual_seed(0)
    fm = from_module(TinyASR().eval(), (torch.randn(2, 8, 32),))
    out = tmp_path_factory.mktemp("reference") / "out"
    return quantize(fm, FAST_PIPELINE, output=str(out), target="reference", progress=False), out


@pytest.fixture
def written(_written_once, tmp_path):
    """(the QuantizeResult, a fresh copy of its reference folder that a test may damage)."""
    result, folder = _written_once
    out = tmp_path / "out"
    shutil.copytree(folder, out)
    return result, out


# --------------------------------------------------------------------------- registry


def test_list_targets_has_reference_with_a_one_line_summary():
    targets = {t.name: t for t in list_targets()}
    assert "reference" in targets and isinstance(targets["reference"], ReferenceTarget)
    ref = targets["reference"]
    assert ref.summary and "\n" not in ref.summary
    assert ref.available() == (True, "")
    assert ref.files == ("model.pt2",)
    assert [t.name for t in list_targets()] == sorted(targets)
    ok, why = get_target("unavailable-for-test").available()
    assert not ok and why and "\n" not in why


def test_unknown_target_says_did_you_mean_in_one_line():
    with pytest.raises(QpipeError) as err:
        get_target("refrence")
    assert str(err.value) == "unknown target 'refrence' (did you mean 'reference'?); see --list-targets"
    with pytest.raises(QpipeError) as err:
        get_target("no-such")
    msg = str(err.value)
    assert msg.startswith("unknown target 'no-such' (targets: ") and "reference" in msg and "\n" not in msg


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(QpipeError, match="target 'reference' is already registered"):
        register_target(ReferenceTarget)
    with pytest.raises(QpipeError, match="already registered"):
        register_target(_ProgramElsewhere())
    assert isinstance(get_target("reference"), ReferenceTarget)

    class Bad(ReferenceTarget):
        name = "Not A Name"

    with pytest.raises(QpipeError, match="lower-case"):
        register_target(Bad)
    with pytest.raises(QpipeError, match="not a qpipe.backends.Target"):
        register_target(object())


# --------------------------------------------------------------------------- the reference target and the folder


def test_reference_round_trip_is_bit_exact(written):
    result, out = written
    assert sorted(os.listdir(out)) == ["ir.txt", "model.pt2", "qpipe.json", "report.html", "report.txt"]
    meta = json.loads((out / "qpipe.json").read_text())
    assert meta["target"] == "reference" and meta["format"] == "qpipe-int8/1"
    qm = open_folder(str(out))
    assert isinstance(qm, QuantizedModel) and qm.target is get_target("reference")
    assert qm.output_scale == float(result.gm.meta["qpipe_outputs"][0]["scale"])
    assert isinstance(qm.runner, Runner)
    for shape in [(1, 8, 32), (3, 8, 45), (2, 8, 7)]:
        x = torch.randn(*shape)
        got = qm.logits_int(x)
        with torch.no_grad():
            want = result.gm(x)
        assert got.dtype == want.dtype and not got.dtype.is_floating_point
        assert torch.equal(got, want)


def test_a_folder_without_target_opens_as_reference(written):
    result, out = written
    meta = json.loads((out / "qpipe.json").read_text())
    del meta["target"]  # as written before targets existed
    (out / "qpipe.json").write_text(json.dumps(meta))
    qm = open_folder(str(out))
    assert qm.target.name == "reference"
    x = torch.randn(2, 8, 40)
    with torch.no_grad():
        assert torch.equal(qm.logits_int(x), result.gm(x))


def test_opening_bad_folders_fails_in_one_line(written, tmp_path):
    _, out = written
    with pytest.raises(QpipeError, match="is not a qpipe output folder"):
        open_folder(str(tmp_path / "nothing"))
    meta = json.loads((out / "qpipe.json").read_text())
    (out / "qpipe.json").write_text(json.dumps({**meta, "target": "tensorrt-from-the-future"}))
    with pytest.raises(QpipeError, match=r"written for target 'tensorrt-from-the-future', which this qpipe does not have \(targets: .*reference"):
        open_folder(str(out))
    assert read_meta(str(out))["target"] == "tensorrt-from-the-future"  # its facts still read (inspect)
    (out / "qpipe.json").write_text(json.dumps({**meta, "format": "qpipe-int8/99"}))
    with pytest.raises(QpipeError, match="unknown format"):
        open_folder(str(out))
    (out / "qpipe.json").write_text(json.dumps(meta))
    os.remove(out / "model.pt2")
    with pytest.raises(QpipeError, match="model.pt2 is missing"):
        open_folder(str(out))
    (out / "model.pt2").write_bytes(b"not a zip")
    with pytest.raises(QpipeError) as err:
        open_folder(str(out)).runner
    assert str(err.value).startswith(f"{out}: cannot load model.pt2: ") and "\n" not in str(err.value)


def test_inspect_reads_any_targets_folder(written):
    from qpipe.inspect import facts_from_path

    _, out = written
    meta = json.loads((out / "qpipe.json").read_text())
    (out / "qpipe.json").write_text(json.dumps({**meta, "target": "tensorrt-from-the-future"}))
    facts = facts_from_path(str(out))
    assert facts.stage == "integer" and any("conv1d" in r["op"] for r in facts.rows)


def test_a_second_target_plugs_in_through_the_same_folder(tiny_float_model, tmp_path):
    out = tmp_path / "out"
    result = quantize(tiny_float_model, FAST_PIPELINE, output=str(out), target="program-elsewhere-for-test", progress=False)
    assert sorted(os.listdir(out)) == ["ir.txt", "program.pt2", "qpipe.json", "report.html", "report.txt"]
    qm = open_folder(str(out))
    assert qm.target.name == "program-elsewhere-for-test"
    x = torch.randn(2, 8, 33)
    with torch.no_grad():
        assert torch.equal(qm.logits_int(x), result.gm(x))


def test_an_unavailable_target_fails_before_any_work(tiny_float_model, tmp_path, monkeypatch):
    import qpipe.api
    from qpipe.ir import print_ir

    monkeypatch.setattr(qpipe.api, "run_pipeline", lambda *a, **k: pytest.fail("ran the pipeline"))

    before = print_ir(tiny_float_model.gm)
    out = tmp_path / "out"
    with pytest.raises(QpipeError) as err:
        quantize(tiny_float_model, FAST_PIPELINE, output=str(out), target="unavailable-for-test", progress=False)
    assert str(err.value) == "target 'unavailable-for-test' is not available here: needs the moon (pip install moon)"
    assert not out.exists() and os.listdir(tmp_path) == []
    assert print_ir(tiny_float_model.gm) == before
    with pytest.raises(QpipeError, match="unknown target 'no-such'"):
        quantize("does/not/exist.nemo", FAST_PIPELINE, output=str(out), target="no-such", progress=False)


def test_pass_records_and_report_show_verify_time_apart(written):
    result, out = written
    meta = json.loads((out / "qpipe.json").read_text())
    assert [p["name"] for p in meta["passes"]][0] == "fold-bn"
    for p in meta["passes"]:
        assert isinstance(p["seconds"], float) and isinstance(p["verify_seconds"], float) and p["verify_seconds"] >= 0
    header = next(line for line in result.report.splitlines() if line.startswith("pass "))
    assert header.split()[:4] == ["pass", "seconds", "verify", "changed"]
    assert (out / "report.txt").read_text() == result.report
    assert "verify_seconds" in result.metrics


# --------------------------------------------------------------------------- CLI


def _cli(*args, timeout=120):
    return subprocess.run(QPIPE + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_cli_list_targets():
    proc = _cli("--list-targets")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    ref = [line for line in lines if line.split()[:1] == ["reference"]]
    assert len(ref) == 1 and get_target("reference").summary in ref[0]
    assert proc.stderr == ""


def test_cli_unknown_target_fails_before_loading_the_model(tmp_path):
    """Checked before the model loads: the subprocess fails if anything imports NeMo (what loading needs)."""
    model = os.path.join(ROOT, "models", "demo_quartznet.nemo")
    out = tmp_path / "out"
    guard = ("import sys, importlib.abc\n"
             "class NoNemo(importlib.abc.MetaPathFinder):\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] == 'nemo': raise SystemExit('loaded the model: imported nemo')\n"
             "sys.meta_path.insert(0, NoNemo())\n"
             "from qpipe.cli import main; sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", guard, model, "-o", str(out), "--target", "no-such"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()]  # one line
    assert proc.stderr.startswith("qpipe: error: unknown target 'no-such' (")
    assert proc.stderr.rstrip().endswith("; see --list-targets") and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not out.exists() and os.listdir(tmp_path) == []
    near = _cli(model, "-o", out, "--target", "refrence", timeout=60)
    assert near.returncode == 2 and "(did you mean 'reference'?)" in near.stderr


def test_cli_help_mentions_targets():
    proc = _cli("--help")
    assert proc.returncode == 0 and "--target" in proc.stdout and "--list-targets" in proc.stdout


def test_unknown_target_does_not_import_nemo():
    code = (
        "import sys\nfrom qpipe.api import quantize\nfrom qpipe.ir.errors import QpipeError\n"
        "try:\n    quantize('models/demo_quartznet.nemo', output='/nonexistent/out', target='no-such')\n"
        "except QpipeError as e:\n    print(e)\nprint('nemo' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.stdout.splitlines()[-1] == "False", proc.stderr[-2000:]
    assert "unknown target 'no-such'" in proc.stdout


def test_cli_inspect_opens_an_output_folder(written):
    _, out = written
    proc = _cli("inspect", out)
    assert proc.returncode == 0, proc.stderr
    assert "conv1d" in proc.stdout
