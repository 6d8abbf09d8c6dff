"""tools/bench/inference.py end to end in --quick mode on the NeMo-free toy model.

Every requested candidate must come back with positive times from its own process,
ratios against the baselines that ran, sizes on disk, and a peak RSS that is the
child's own (not the parent's, which ``getrusage`` would carry across exec); a
target that does not exist is skipped with a line, not an error.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tools", "bench", "inference.py")


@pytest.mark.slow
def test_quick_run_has_every_candidate(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "bench.json"
    wanted = ["torch-fp32", "ort-fp32", "ort-int8", "ort-uint8", "reference", "onnx-qdq"]
    cmd = [sys.executable, SCRIPT, "--quick", "--cache", str(tmp_path / "cache"), "--json", str(out),
           "--candidates", *wanted, "no-such-target"]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping qpipe no-such-target" in proc.stderr
    result = json.loads(out.read_text())
    rows = {r["candidate"]: r for r in result["rows"]}
    assert sorted(rows) == sorted(wanted)
    assert result["skipped"] == [{"model": "torch_tiny", "candidate": "no-such-target"}]
    for name, r in rows.items():
        assert r["batch"] == 1 and r["median_ms"] > 0 and r["calls"] >= 1, name
        assert all(t > 0 for t in r["round_medians_ms"]), name
        assert r["size_mb"] > 0, name
        assert 0 < r["rss_after_imports_mb"] <= r["peak_rss_mb"], name
        assert set(r["ratio_vs"]) == {"torch-fp32", "ort-fp32", "ort-int8", "ort-uint8"}, name
    assert rows["torch-fp32"]["ratio_vs"]["torch-fp32"] == 1.0
    assert rows["onnx-qdq"]["ratio_vs"]["ort-uint8"] == pytest.approx(
        rows["onnx-qdq"]["median_ms"] / rows["ort-uint8"]["median_ms"], rel=1e-3)
    # the integer outputs of the two qpipe targets were compared, and the markdown table names every candidate
    agree = result["checks"]["torch_tiny"]["agreement_vs_reference"]["onnx-qdq"]["random_features"]
    assert agree["frames"] > 0 and agree["max_abs_diff_steps"] >= 0
    for label in ("torch fp32", "ORT fp32", "ORT qdq int8", "ORT qdq uint8", "qpipe reference", "qpipe onnx-qdq"):
        assert f"| torch_tiny | 1 | {label} |" in proc.stdout
