"""A tiny Citrinet-like block, written the way NeMo's ``SqueezeExcite`` is (masked
mean over time from the lengths, inside ``autocast(enabled=False)``, a sigmoid gate,
a product, then the residual add and ReLU), through the default passes: the frontend
inlines the autocast region, the mean becomes ``qpipe.mean_int`` dividing by the
graph's own integer frame count, the gate ``qpipe.sigmoid_int`` at 16 bits, the
product ``qpipe.mul_requant``, and nothing float is left."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import FileCheck

from conftest import FAST_PIPELINE, randomize_batchnorm
from qpipe.frontends.torch import from_module
from qpipe.ir import print_ir
from qpipe.ir.passes import run_pipeline
from qpipe.ir.verifier import integer_region


class SqueezeExcite(torch.nn.Module):
    """NeMo's SqueezeExcite.forward_for_export at toy size (global context, ReLU inside)."""

    def __init__(self, c: int, reduction: int = 4):
        super().__init__()
        self.fc = torch.nn.Sequential(torch.nn.Linear(c, c // reduction, bias=False), torch.nn.ReLU(inplace=True),
                                      torch.nn.Linear(c // reduction, c, bias=False))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        seq = torch.arange(x.shape[-1], device=x.device)
        with torch.amp.autocast(x.device.type, enabled=False):
            mask = ~(seq.expand(lengths.size(0), -1) < lengths.unsqueeze(-1)).unsqueeze(1)  # 1 = padding
            x = x.float().masked_fill(mask, 0.0)
            valid = ~mask
            y = torch.sum(x, dim=-1, keepdim=True) / valid.sum(dim=-1, keepdim=True).type(x.dtype)
            y = self.fc(y.transpose(1, -1)).transpose(1, -1)
            y = x * torch.sigmoid(y)
        return y


class CitrinetBlock(torch.nn.Module):
    def __init__(self, features: int = 8, c: int = 16, classes: int = 6):
        super().__init__()
        self.pre = torch.nn.Conv1d(features, c, 1, bias=False)
        self.pre_bn = torch.nn.BatchNorm1d(c)
        self.dw = torch.nn.Conv1d(c, c, 5, padding=2, groups=c, bias=False)
        self.pw = torch.nn.Conv1d(c, c, 1, bias=False)
        self.bn = torch.nn.BatchNorm1d(c)
        self.se = SqueezeExcite(c)
        self.res = torch.nn.Conv1d(c, c, 1, bias=False)
        self.res_bn = torch.nn.BatchNorm1d(c)
        self.head = torch.nn.Conv1d(c, classes, 1)
        randomize_batchnorm(self.pre_bn, self.bn, self.res_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = torch.full((x.shape[0],), x.shape[2], dtype=torch.int64)
        h = torch.relu(self.pre_bn(self.pre(x)))
        y = self.se(self.bn(self.pw(self.dw(h))), lengths)
        y = torch.relu(y + self.res_bn(self.res(h)))
        return torch.log_softmax(self.head(y).transpose(1, 2), dim=-1)


@pytest.fixture(scope="module")
def citrinet_run():
    torch.manual_seed(0)
    fm = from_module(CitrinetBlock().eval(), (torch.randn(2, 8, 32),))
    ref = copy.deepcopy(fm.gm)
    return ref, run_pipeline(fm.gm, FAST_PIPELINE, state=fm.pipeline_state(), progress=False)


def test_autocast_region_is_inlined():
    torch.manual_seed(0)
    fm = from_module(CitrinetBlock().eval(), (torch.randn(2, 8, 32),))
    targets = {str(n.target) for n in fm.gm.graph.nodes if n.op == "call_function"}
    assert not any("wrap_with_autocast" in t for t in targets)
    assert "aten.sigmoid.default" in targets and "aten.masked_fill.Scalar" in targets


def test_squeeze_excite_becomes_integer(citrinet_run):
    ref, run = citrinet_run
    text = print_ir(run.gm)
    FileCheck().check("qpipe.quantize(%x").check("qpipe.conv1d_rq(").check("qpipe.masked_fill_int(") \
        .check("qpipe.mean_int(").check("count=%sum_2").check("dim=[-1], keepdim=true").check(": i8[B,16,1]") \
        .check("qpipe.linear_rq(").check("lo=0, hi=255, bits=8, f32=true)").check(": u8[B,1,4]").check("qpipe.linear_rq(") \
        .check("qpipe.sigmoid_int(").check("bits=16)").check(": i16[B,16,1]") \
        .check("qpipe.mul_requant(").check(": i8[B,16,T]") \
        .check("qpipe.add_requant(").check("lo=0, hi=255").check(": u8[B,16,T]").check("qpipe.conv1d_rq(").check("bits=16)").check("return").run(text)
    # the frame count (bool mask -> int64 sum) stays: integer shape arithmetic outside the quantized region
    FileCheck().check("aten.sum.dim_IntList(%bitwise_not").check_not("aten.sum").run(text)
    for op in ("aten.div", "aten.mul", "aten.sigmoid", "aten.masked_fill", "aten.relu", "aten.to", "aten._to_copy"):
        FileCheck().check("qpipe.quantize(%x").check_not(op).check("return").run(text)
    stats = next(r.stats for r in run.records if r.name == "substitute-int-ops")
    assert (stats["mean"], stats["sigmoid"], stats["mul"]) == (1, 1, 1)
    assert run.records[-1].stats["float_ops"] == 0
    assert all(not n.meta["val"].is_floating_point() for n in integer_region(run.gm))
    # the count the mean divides by is the graph's own (the frames the lengths say are valid), not a float
    mean = next(n for n in run.gm.graph.nodes if n.target is torch.ops.qpipe.mean_int.default)
    assert mean.args[1].meta["val"].dtype == torch.int64


def test_squeeze_excite_numbers(citrinet_run):
    ref, run = citrinet_run
    x = torch.randn(3, 8, 45)
    with torch.no_grad():
        want = ref(x).to(torch.float64)
        got = run.gm(x).to(torch.float64) * run.gm.meta["qpipe_outputs"][0]["scale"]
    got = got - got.logsumexp(-1, keepdim=True)
    sqnr = float(10 * torch.log10(want.pow(2).sum() / (want - got).pow(2).sum()))
    assert sqnr > 25, sqnr
    assert float((want.argmax(-1) == got.argmax(-1)).double().mean()) > 0.9
