"""The nonlinear op families through the default passes on tiny graphs: a gated
conv block (GLU, depthwise conv + BN + SiLU), a squeeze-excite (mean over time,
sigmoid gate, product, ReLU), a feed-forward SiLU, a softmax and a GELU. FileCheck
on the printed IR, the stats counters, the verifier, and the numbers against float."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch.testing import FileCheck

from conftest import FAST_PIPELINE, randomize_batchnorm
from qpipe.frontends.torch import from_module
from qpipe.ir import print_ir
from qpipe.ir.errors import QpipeError
from qpipe.ir.meta import QPOLICY
from qpipe.ir.passes import run_pipeline
from qpipe.ir.policy import QuantSpec
from qpipe.ir.qtype import QTYPE, QType
from qpipe.ir.stages import Stage
from qpipe.ir.verifier import integer_region, verify

F = torch.nn.functional


class Gated(torch.nn.Module):
    def __init__(self, features: int = 8, c: int = 16, classes: int = 6):
        super().__init__()
        self.pw = torch.nn.Conv1d(features, 2 * c, 1)
        self.dw = torch.nn.Conv1d(c, c, 5, padding=2, groups=c, bias=False)
        self.bn = torch.nn.BatchNorm1d(c)
        self.se1 = torch.nn.Linear(c, c // 4, bias=False)
        self.se2 = torch.nn.Linear(c // 4, c, bias=False)
        self.ff1 = torch.nn.Linear(c, 2 * c)
        self.ff2 = torch.nn.Linear(2 * c, c)
        self.ff3 = torch.nn.Linear(c, c)
        self.head = torch.nn.Linear(c, classes)
        randomize_batchnorm(self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.bn(self.dw(F.glu(self.pw(x), dim=1))))
        g = torch.sigmoid(self.se2(torch.relu(self.se1(h.mean(dim=-1, keepdim=True).transpose(1, 2)))).transpose(1, 2))
        h = torch.relu(h * g).transpose(1, 2)
        h = F.gelu(self.ff3(torch.softmax(self.ff2(F.silu(self.ff1(h))), dim=-1)))
        return torch.log_softmax(self.head(h), dim=-1)


def _model():
    torch.manual_seed(0)
    return from_module(Gated().eval(), (torch.randn(2, 8, 32),))


def _sqnr_db(ref_gm, int_gm, x) -> float:
    ref = ref_gm(x)
    got = int_gm(x).to(torch.float64) * int_gm.meta["qpipe_outputs"][0]["scale"]
    ref = ref - ref.logsumexp(-1, keepdim=True)  # compare log-probs: log_softmax is the float tail
    got = got - got.logsumexp(-1, keepdim=True)
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()))


@pytest.fixture(scope="module")
def lowered():
    """(float graph, the default passes' run) of the tiny gated model, run once for the module."""
    fm = _model()
    ref = copy.deepcopy(fm.gm)
    return ref, run_pipeline(fm.gm, FAST_PIPELINE, state=fm.pipeline_state(), progress=False)


def test_gates_softmax_gelu_and_mean_become_integer(lowered):
    ref, run = lowered
    text = print_ir(run.gm)
    FileCheck().check("qpipe.quantize(%x").check("qpipe.conv1d_rq(").check("qpipe.glu_int(").check("dim=1") \
        .check(": i8[B,16,T]").check("qpipe.conv1d_rq(").check("qpipe.silu_int(") \
        .check("qpipe.mean_int(").check("count=None, dim=[-1], keepdim=true").check(": i8[B,16,1]") \
        .check("qpipe.sigmoid_int(").check("bits=16)").check(": i16[B,16,1] q16<3.05185e-05>") \
        .check("qpipe.mul_requant(").check("lo=0, hi=255").check(": u8[B,16,T]") \
        .check("qpipe.silu_int(").check("qpipe.softmax_int(").check("dim=-1").check("bits=8)").check("q8<0.00787402>") \
        .check("qpipe.gelu_int(").check("qpipe.linear_rq(").check("bits=16)").check("return").run(text)
    for op in ("aten.glu", "aten.silu", "aten.sigmoid", "aten.mul", "aten.mean", "aten.softmax", "aten.gelu", "aten.relu", "f32["):
        FileCheck().check("qpipe.quantize(%x").check_not(op).check("return").run(text)
    stats = next(r.stats for r in run.records if r.name == "substitute-int-ops")
    assert (stats["glu"], stats["silu"], stats["sigmoid"], stats["mul"], stats["mean"], stats["softmax"], stats["gelu"]) == (1, 2, 1, 1, 1, 1, 1)
    assert run.records[-1].stats["float_ops"] == 0
    assert all(not n.meta["val"].is_floating_point() for n in integer_region(run.gm))
    x = torch.randn(3, 8, 40)
    assert _sqnr_db(ref, run.gm, x) > 25


def test_softmax_output_bits_follow_the_node_policy():
    fm = _model()
    state = fm.pipeline_state()
    observed = run_pipeline(fm.gm, "fold-bn,insert-observers", state=state, progress=False).gm
    softmax = next(n for n in observed.graph.nodes if n.target is torch.ops.aten.softmax.int)
    softmax.meta[QPOLICY] = QuantSpec(bits=16)
    run = run_pipeline(observed, FAST_PIPELINE.split(",", 2)[2], state=state, progress=False)
    FileCheck().check("qpipe.softmax_int(").check("bits=16)").check(": i16[B,T,16] q16<3.05185e-05>").run(print_ir(run.gm))


def test_verifier_checks_fixed_and_product_scales(lowered):
    gm = copy.deepcopy(lowered[1].gm)
    verify(gm, Stage.INTEGER)
    softmax = next(n for n in gm.graph.nodes if n.target is torch.ops.qpipe.softmax_int.default)
    softmax.meta[QTYPE] = QType.of(8, 1 / 128)
    with pytest.raises(QpipeError, match="fixed scale 0.00787"):
        verify(gm, Stage.INTEGER)
    softmax.meta[QTYPE] = QType.of(8, 1 / 127)
    mul = next(n for n in gm.graph.nodes if n.target is torch.ops.qpipe.mul_requant.default)
    mul.meta[QTYPE] = dataclasses.replace(mul.meta[QTYPE], scale=mul.meta[QTYPE].scale * 1.01)
    with pytest.raises(QpipeError, match="does not take the product scale"):
        verify(gm, Stage.INTEGER)
