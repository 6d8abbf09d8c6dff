"""Integer conv2d through the default passes: a Conformer-style striding subsampling
(conv2d + BN + ReLU twice, then a linear CTC head) becomes qpipe.conv2d_rq and nothing float."""
from __future__ import annotations

import copy

import torch
from torch.testing import FileCheck

from conftest import FAST_CALIBRATION, FAST_PIPELINE, randomize_batchnorm
from qpipe.api import compare_outputs
from qpipe.frontends.torch import from_module
from qpipe.ir import print_ir
from qpipe.ir.passes import run_pipeline
from qpipe.ir.verifier import integer_region


class Subsampling(torch.nn.Module):
    """NeMo's ConvSubsampling shape: (B, F, T) -> (B, 1, T, F) -> two stride-2 conv2d -> (B, T/4, C*F/4)."""

    def __init__(self, features: int = 16, channels: int = 4, classes: int = 5):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(channels)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=2, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(channels)
        self.head = torch.nn.Linear(channels * features // 4, classes)
        randomize_batchnorm(self.bn1, self.bn2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2).unsqueeze(1)
        h = torch.relu(self.bn1(self.conv1(h)))
        h = torch.relu(self.bn2(self.conv2(h)))
        h = h.transpose(1, 2).flatten(2)
        return torch.log_softmax(self.head(h), dim=-1)


def _model():
    torch.manual_seed(0)
    return from_module(Subsampling().eval(), (torch.randn(2, 16, 32),), time_multiple=4)


def test_conv2d_subsampling_becomes_integer():
    fm = _model()
    ref = copy.deepcopy(fm.gm)
    state = fm.pipeline_state()
    run = run_pipeline(fm.gm, FAST_PIPELINE, state=state, progress=False)
    text = print_ir(run.gm)
    FileCheck().check("// stage: integer").check("qpipe.quantize(%x").check("aten.unsqueeze") \
        .check("qpipe.conv2d_rq(").check("stride=[2, 2], padding=[1, 1]").check("lo=0, hi=255, bits=8, f32=true)").check(": u8[B,4,") \
        .check("qpipe.conv2d_rq(").check("groups=2").check("lo=0, hi=255, bits=8, f32=true)") \
        .check("qpipe.linear_rq(").check("bits=16)").check_not("aten.conv2d").check_not("aten.relu").run(text)
    FileCheck().check_count("qpipe.conv2d_rq", 2, exactly=True).check_not("qpipe.conv2d_acc").run(text)
    assert run.records[0].stats["folded"] == 2
    assert run.records[-1].stats["float_ops"] == 0
    for node in integer_region(run.gm):
        assert not node.meta["val"].is_floating_point(), node.name
    metrics = compare_outputs(ref, run.gm, state.calibration_inputs)
    assert metrics["logprob_sqnr_db"] > 20, metrics


def test_conv2d_fusion_is_bit_exact():
    fm = _model()
    unfused = run_pipeline(copy.deepcopy(fm.gm), f"fold-bn,insert-observers,{FAST_CALIBRATION},substitute-int-ops",
                           state=fm.pipeline_state(), progress=False).gm
    FileCheck().check("qpipe.conv2d_acc").check("qpipe.requant").run(print_ir(unfused))
    fused = run_pipeline(copy.deepcopy(unfused), "fuse-requant", progress=False).gm
    x = torch.randn(3, 16, 44)
    a, b = unfused(x), fused(x)
    assert a.dtype == torch.int16 and torch.equal(a, b)
