"""The same model, pipeline and seed give a byte-identical model.pt2 and the same qpipe.json
apart from its timing and date fields (issue 23, item 4).

Each run is its own process with its own PYTHONHASHSEED, so set orders, object ids
and memory addresses all differ between the runs, as between two users' runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

HERE = os.path.dirname(os.path.abspath(__file__))

_RUN = """
import sys
sys.path[:0] = [{tests!r}, {here!r}]
import torch
torch.set_num_threads(1)
import qpipe.api as qp
from cli_fixtures import tiny_float_model
from conftest import FAST_PIPELINE
qp.quantize(tiny_float_model(), FAST_PIPELINE, output=sys.argv[1], progress=False)
"""


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _spawn(cmd: list[str], hash_seed: str) -> subprocess.Popen:
    """One run on one thread in its own process (two of them run side by side on two cores)."""
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _two_runs(tmp_path, cmd_for) -> tuple:
    """Runs A and B (hash seeds 1 and 2) at once; their output folders once both succeeded."""
    runs = [(tmp_path / name, _spawn(cmd_for(tmp_path / name), seed)) for name, seed in (("A", "1"), ("B", "2"))]
    for _, proc in runs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
    return tuple(out for out, _ in runs)


def _same_except_timing(a: str, b: str) -> None:
    from qpipe.backends.folder import without_timing

    meta_a, meta_b = (json.load(open(os.path.join(p, "qpipe.json"))) for p in (a, b))
    assert meta_a["created"] and meta_a["passes"]  # the fields dropped exist: the comparison drops something real
    assert without_timing(meta_a) == without_timing(meta_b)


@pytest.mark.slow
def test_two_runs_give_identical_artifacts(tmp_path):
    code = _RUN.format(tests=os.path.join(ROOT, "tests"), here=HERE)
    a, b = _two_runs(tmp_path, lambda out: [sys.executable, "-c", code, str(out)])
    assert _sha(a / "model.pt2") == _sha(b / "model.pt2")
    assert _sha(a / "frontend.pt") == _sha(b / "frontend.pt")
    assert (a / "ir.txt").read_text() == (b / "ir.txt").read_text()
    _same_except_timing(str(a), str(b))


def test_without_timing_drops_only_timing_fields():
    from qpipe.backends.folder import without_timing

    meta = {"created": "2026-01-01T00:00:00Z", "pipeline": "p", "passes": [{"name": "x", "seconds": 1.0, "verify_seconds": 0.1, "stats": {"n": 1}}],
            "metrics": {"load_seconds": 2.0, "pipeline_seconds": 3.0, "verify_seconds": 0.5, "final_mb": 1.0}}
    assert without_timing(meta) == {"pipeline": "p", "passes": [{"name": "x", "stats": {"n": 1}}], "metrics": {"final_mb": 1.0}}
    assert meta["created"]  # the argument is left as it was


@pytest.mark.nemo
@pytest.mark.slow
def test_demo_quartznet_twice_from_the_cli_byte_identical(tmp_path):
    """The bundled model through the CLI twice (a short calibration, same seed), side by side."""
    from conftest import FAST_PIPELINE

    demo = os.path.join(ROOT, "models", "demo_quartznet.nemo")
    qpipe = [sys.executable, os.path.join(ROOT, "tools", "qpipe"), demo, "--passes", FAST_PIPELINE, "--quiet"]
    a, b = _two_runs(tmp_path, lambda out: qpipe + ["-o", str(out)])
    assert _sha(a / "model.pt2") == _sha(b / "model.pt2")
    assert (a / "ir.txt").read_text() == (b / "ir.txt").read_text()
    _same_except_timing(str(a), str(b))
