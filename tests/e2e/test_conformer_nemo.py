"""NeMo Conformer-CTC (built from its config, random weights, non-default BatchNorm) through the
default passes on the CLI: every op integer, printed IR FileChecked, the folder written and reloaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.testing import FileCheck

from conftest import FAST_PIPELINE, ROOT

pytestmark = [pytest.mark.nemo, pytest.mark.slow]
QPIPE = [sys.executable, os.path.join(ROOT, "tools", "qpipe")]


def test_conformer_tiny_becomes_integer_only(tmp_path):
    from qpipe.frontends.nemo_configs import build_random_nemo

    path = build_random_nemo("conformer_tiny", str(tmp_path / "conformer.nemo"), seed=1)
    out = tmp_path / "out"
    proc = subprocess.run(QPIPE + [path, "--passes", FAST_PIPELINE, "-o", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "float_ops=0" in proc.stdout
    ir = (out / "ir.txt").read_text()
    FileCheck().check("// stage: integer").check("qpipe.quantize(%features") \
        .check("qpipe.masked_fill_int(").check("qpipe.conv2d_rq(").check("stride=[2, 2]") \
        .check("qpipe.conv2d_rq(").check("qpipe.linear_rq(") \
        .check("qpipe.layer_norm_core(").check(": i16[").check("qpipe.scale_rq(") \
        .check("qpipe.silu_int(").check("qpipe.add_requant(") \
        .check("qpipe.matmul_rq(").check("qpipe.pad_int(").check("pad=[1, 0]") \
        .check("qpipe.matmul_rq(").check("qpipe.add_requant(").check("qpipe.scale_rq(") \
        .check("qpipe.masked_softmax_int(").check("fill=-10000.0") \
        .check("qpipe.masked_fill_int(").check("value=0").check("qpipe.matmul_rq(") \
        .check("qpipe.glu_int(").check("qpipe.masked_fill_int(").check("qpipe.pad_int(").check("pad=[7, 7]") \
        .check("qpipe.conv1d_rq(").check("groups=64").check("qpipe.silu_int(").run(ir)
    FileCheck().check_count("qpipe.layer_norm_core(", 10, exactly=True).run(ir)  # 5 per layer, 2 layers
    FileCheck().check_count("qpipe.masked_softmax_int(", 2, exactly=True).run(ir)
    assert "qpipe.softmax_int(" not in ir  # both attention softmaxes take their mask inside
    FileCheck().check_count("qpipe.matmul_rq(", 6, exactly=True).check_not("qpipe.matmul_acc").run(ir)
    for op in ("aten.layer_norm", "aten.matmul", "aten.softmax", "aten.linear(", "aten.conv", "aten.batch_norm",
               "aten.mul.Tensor", "aten.div.Tensor", "aten.masked_fill", "aten.pad(", "aten.silu", "aten.glu"):
        assert op not in ir, op
    meta = json.loads((out / "qpipe.json").read_text())
    assert meta["target"] == "reference"
    from qpipe.backends import open_folder

    model = open_folder(str(out))
    logits = model.logits_int(torch.randn(1, 80, 160))
    assert logits.shape == (1, 40, 29) and not logits.is_floating_point()
