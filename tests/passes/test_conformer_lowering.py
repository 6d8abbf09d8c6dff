"""A Conformer block at toy size, written as NeMo writes it (no NeMo import), through
the default passes: xscaling and the 0.5 feed-forward factor folded into weights,
LayerNorm as layer_norm_core + scale_rq, rel-pos attention with its constants
quantized (pos_bias_u/v, linear_pos of a positional-encoding slice folded into one
constant), rel_shift's pad, masked_fill(-10000) + softmax as one masked softmax, both
matmuls, the conv module's depthwise conv + BN folded, and no float op left."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.testing import FileCheck

from conftest import FAST_CALIBRATION, FAST_PIPELINE, randomize_batchnorm
from qpipe.api import compare_outputs
from qpipe.frontends.torch import from_module
from qpipe.ir import QpipeError, print_ir
from qpipe.ir.passes import parse_pipeline, run_pipeline
from qpipe.ir.verifier import integer_region


class ToyConformer(torch.nn.Module):
    def __init__(self, feat: int = 8, d: int = 16, heads: int = 2, classes: int = 6, max_len: int = 64):
        super().__init__()
        self.h, self.dk = heads, d // heads
        self.inp = torch.nn.Linear(feat, d)
        self.xscale = math.sqrt(d)
        pe = torch.randn(1, 2 * max_len - 1, d) * 0.5
        self.register_buffer("pe", pe)
        self.max_len = max_len
        self.ln_ff = torch.nn.LayerNorm(d)
        self.ff1, self.ff2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
        self.ln_att = torch.nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.pos = torch.nn.Linear(d, d, bias=False)
        self.bias_u = torch.nn.Parameter(torch.randn(heads, self.dk) * 0.1)
        self.bias_v = torch.nn.Parameter(torch.randn(heads, self.dk) * 0.1)
        self.ln_conv = torch.nn.LayerNorm(d)
        self.pw1 = torch.nn.Conv1d(d, 2 * d, 1)
        self.dw = torch.nn.Conv1d(d, d, 5, groups=d)
        self.bn = torch.nn.BatchNorm1d(d)
        self.pw2 = torch.nn.Conv1d(d, d, 1)
        self.ln_out = torch.nn.LayerNorm(d)
        self.head = torch.nn.Conv1d(d, classes, 1)
        self.drop = torch.nn.Dropout(0.1)
        randomize_batchnorm(self.bn)
        with torch.no_grad():
            self.ln_att.weight.uniform_(0.5, 1.5)
            self.ln_att.bias.uniform_(-0.2, 0.2)

    def rel_shift(self, x: torch.Tensor) -> torch.Tensor:
        b, h, t, p = x.shape
        x = torch.nn.functional.pad(x, pad=(1, 0))
        x = x.view(b, h, -1, t)[:, :, 1:].view(b, h, t, p)
        return x

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (B, F, T)
        b, t = feats.shape[0], feats.shape[2]
        x = self.inp(feats.transpose(1, 2)) * self.xscale
        pos = self.pe[:, self.max_len - t: self.max_len + t - 1]
        x = x + 0.5 * self.drop(self.ff2(self.drop(torch.nn.functional.silu(self.ff1(self.ln_ff(x))))))
        y = self.ln_att(x)
        q = self.q(y).view(b, -1, self.h, self.dk)
        k = self.k(y).view(b, -1, self.h, self.dk).transpose(1, 2)
        v = self.v(y).view(b, -1, self.h, self.dk).transpose(1, 2)
        p = self.pos(pos).view(1, -1, self.h, self.dk).transpose(1, 2)
        q_u = (q + self.bias_u).transpose(1, 2)
        q_v = (q + self.bias_v).transpose(1, 2)
        ac = torch.matmul(q_u, k.transpose(-2, -1))
        bd = self.rel_shift(torch.matmul(q_v, p.transpose(-2, -1)))[:, :, :, : ac.size(-1)]
        scores = (ac + bd) / math.sqrt(self.dk)
        mask = torch.zeros(b, 1, t, t, dtype=torch.bool)
        attn = torch.softmax(scores.masked_fill(mask, -10000.0), dim=-1).masked_fill(mask, 0.0)
        out = torch.matmul(self.drop(attn), v).transpose(1, 2).reshape(b, -1, self.h * self.dk)
        x = x + self.drop(self.o(out))
        c = torch.nn.functional.glu(self.pw1(self.ln_conv(x).transpose(1, 2)), dim=1)
        c = self.pw2(torch.nn.functional.silu(self.bn(self.dw(torch.nn.functional.pad(c, (2, 2))))))
        x = self.ln_out(x + c.transpose(1, 2))
        return torch.log_softmax(self.head(x.transpose(1, 2)).transpose(1, 2), dim=-1)


def _model():
    torch.manual_seed(0)
    return from_module(ToyConformer().eval(), (torch.randn(2, 8, 24),), max_time=60)


def test_toy_conformer_becomes_integer_with_no_float_op():
    fm = _model()
    ref = copy.deepcopy(fm.gm)
    state = fm.pipeline_state()
    run = run_pipeline(fm.gm, FAST_PIPELINE, state=state, progress=False)
    text = print_ir(run.gm)
    FileCheck().check("// stage: integer").check("qpipe.quantize(%feats") \
        .check("qpipe.layer_norm_core(").check("frac_bits=14").check(": i16[").check("qpipe.scale_rq(") \
        .check("qpipe.silu_int(") \
        .check("qpipe.matmul_rq(").check("qpipe.pad_int(").check("pad=[1, 0], value=0") \
        .check("qpipe.add_requant(").check("qpipe.scale_rq(").check("qpipe.masked_softmax_int(").check("fill=-10000.0") \
        .check("qpipe.masked_fill_int(").check("value=0").check("qpipe.matmul_rq(") \
        .check("qpipe.glu_int(").check("qpipe.pad_int(").check("pad=[2, 2]").check("qpipe.conv1d_rq(") \
        .check("groups=16").run(text)
    FileCheck().check_count("qpipe.layer_norm_core(", 4, exactly=True).check_not("aten.layer_norm").run(text)
    FileCheck().check_count("qpipe.matmul_rq(", 3, exactly=True).check_not("qpipe.matmul_acc").run(text)
    for op in ("aten.mul.Tensor", "aten.div.Tensor", "aten.batch_norm", "aten.linear(", "aten.dropout", "aten.pad("):
        assert op not in text, op
    observe = run.records[1].stats
    assert observe["scalars_folded"] == 2  # xscaling, 0.5 (the division by sqrt(d_k) follows an add)
    assert observe["constants_folded"] == 1  # linear_pos of the pe slice
    lower = run.records[3].stats
    assert lower["layer_norm"] == 4 and lower["matmul"] == 3 and lower["scale"] == 1 and lower["constant"] == 3
    assert run.records[-1].stats["float_ops"] == 0
    for node in integer_region(run.gm):
        val = node.meta["val"]
        assert not (isinstance(val, torch.Tensor) and val.is_floating_point()), node.name
    metrics = compare_outputs(ref, run.gm, state.calibration_inputs)
    assert metrics["logprob_sqnr_db"] > 20, metrics


def test_keep16_keeps_softmax_and_layer_norm_outputs_at_16_bits():
    fm = _model()
    pipe = FAST_PIPELINE.replace("insert-observers", "insert-observers{keep16=softmax+layer_norm}")
    run = run_pipeline(fm.gm, pipe, state=fm.pipeline_state(), progress=False)
    text = print_ir(run.gm)
    FileCheck().check("qpipe.masked_softmax_int(").check("bits=16)").check(": i16[").run(text)
    FileCheck().check_count("lo=-32768, hi=32767, bits=16) {", 4).run(
        "\n".join(line for line in text.splitlines() if "qpipe.scale_rq(%layer_norm" in line))
    assert run.records[1].stats["kept16"] == 5  # 4 LayerNorms + 1 softmax
    assert run.records[-1].stats["float_ops"] == 0


def test_keep16_names_are_checked_before_anything_runs():
    with pytest.raises(QpipeError, match=r"keep16=softmx: no op family 'softmx' \(did you mean 'softmax'\?\)"):
        parse_pipeline("fold-bn,insert-observers{keep16=softmx}")
    assert "keep16=softmax+layer_norm" in str(parse_pipeline("insert-observers{keep16=softmax+layer_norm}"))


def test_unfused_matmul_and_fusion_are_bit_exact():
    fm = _model()
    unfused = run_pipeline(copy.deepcopy(fm.gm), f"fold-bn,insert-observers,{FAST_CALIBRATION},substitute-int-ops",
                           state=fm.pipeline_state(), progress=False).gm
    FileCheck().check("qpipe.matmul_acc").check("qpipe.requant").run(print_ir(unfused))
    fused = run_pipeline(copy.deepcopy(unfused), "fuse-requant", progress=False).gm
    x = torch.randn(3, 8, 20)
    a, b = unfused(x), fused(x)
    assert a.dtype == torch.int16 and torch.equal(a, b)
