"""A padded batch through the integer Conformer block: the short utterance's valid frames
come out as when it runs alone.

The toy Conformer of ``test_conformer_lowering`` with NeMo's masks made from lengths
(``att_mask = ~(valid_i & valid_j)`` before the softmax and after it, ``pad_mask`` on the
conv module's input): calibrated with every frame valid, then run on a batch of a short
(zero-padded) and a long utterance. The attention's ``masked_fill(-10000)`` + softmax
lowers to ``qpipe.masked_softmax_int``: a padded key gets probability exactly 0, so
the valid frames' logits are bit-identical to the utterance's own batch-1 logits.
Before (``masked_fill_int`` of the code minimum, then ``softmax_int``) the padded keys
kept ``exp(S * (lo - max))`` of each row's mass: at this toy's score scale (0.0153)
all 78 of the 13 x 6 int16 logit codes differed, by up to 492 codes (0.024 in
log-probability); the float model's two runs differ by 2.4e-7.
"""
from __future__ import annotations

import copy

import torch
from torch.testing import FileCheck

from conftest import FAST_PIPELINE
from qpipe.frontends.torch import from_module
from qpipe.ir import print_ir
from qpipe.ir.graph_utils import fetch_attr
from qpipe.ir.passes import run_pipeline
from test_conformer_lowering import ToyConformer

ALL_VALID = 1 << 20


class PaddedToyConformer(ToyConformer):
    """ToyConformer whose masks come from per-utterance lengths (a buffer: the graph has one input)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("lengths", torch.full((8,), ALL_VALID, dtype=torch.int64))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (B, F, T)
        b, t = feats.shape[0], feats.shape[2]
        valid = torch.arange(t, device=feats.device)[None, :] < self.lengths[:b, None]  # (B, T)
        att_mask = ~(valid[:, None, :, None] & valid[:, None, None, :])  # (B, 1, T, T), as NeMo's
        pad_mask = ~valid
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
        scores = (ac + bd) / (self.dk**0.5)
        attn = torch.softmax(scores.masked_fill(att_mask, -10000.0), dim=-1).masked_fill(att_mask, 0.0)
        out = torch.matmul(self.drop(attn), v).transpose(1, 2).reshape(b, -1, self.h * self.dk)
        x = x + self.drop(self.o(out))
        c = torch.nn.functional.glu(self.pw1(self.ln_conv(x).transpose(1, 2)), dim=1)
        c = c.masked_fill(pad_mask[:, None, :], 0.0)  # NeMo's conv module: padded frames are 0 before the depthwise conv
        c = self.pw2(torch.nn.functional.silu(self.bn(self.dw(torch.nn.functional.pad(c, (2, 2))))))
        x = self.ln_out(x + c.transpose(1, 2))
        return torch.log_softmax(self.head(x.transpose(1, 2)).transpose(1, 2), dim=-1)


SHORT, LONG = 13, 24


def _lengths_buffer(gm: torch.fx.GraphModule) -> torch.Tensor:
    found = [fetch_attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    found = [t for t in found if t.dtype == torch.int64 and t.shape == (8,) and int(t[0]) == ALL_VALID]
    assert len(found) == 1
    return found[0]


def padded_vs_alone(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(the short utterance's valid frames in the padded batch, the same utterance alone at batch 1)."""
    gen = torch.Generator().manual_seed(7)
    short, long_ = torch.randn(1, 8, SHORT, generator=gen), torch.randn(1, 8, LONG, generator=gen)
    batch = torch.zeros(2, 8, LONG)
    batch[0, :, :SHORT], batch[1] = short[0], long_[0]
    lengths = _lengths_buffer(model)
    saved = lengths.clone()
    try:
        lengths[:2] = torch.tensor([SHORT, LONG])
        padded = model(batch)[0, :SHORT]
        alone = model(short)[0]
    finally:
        lengths.copy_(saved)
    return padded, alone


def _quantized():
    torch.manual_seed(0)
    fm = from_module(PaddedToyConformer().eval(), (torch.randn(2, 8, 24),), max_time=60)
    float_gm = copy.deepcopy(fm.gm)
    run = run_pipeline(fm.gm, FAST_PIPELINE, state=fm.pipeline_state(), progress=False)
    return float_gm, run


def test_padded_batch_gives_the_short_utterance_its_own_logits():
    float_gm, run = _quantized()
    text = print_ir(run.gm)
    FileCheck().check("qpipe.masked_softmax_int(").check("fill=-10000.0").check("qpipe.masked_fill_int(") \
        .check("value=0").check("qpipe.matmul_rq(").run(text)
    assert "qpipe.softmax_int(" not in text and "value=-127" not in text
    assert run.records[3].stats["masked_softmax"] == 1
    padded_f, alone_f = padded_vs_alone(float_gm)
    assert torch.allclose(padded_f, alone_f, atol=1e-4), (padded_f - alone_f).abs().max()  # float: the masks are right
    padded, alone = padded_vs_alone(run.gm)
    assert padded.dtype == torch.int16 and padded.shape == alone.shape == (SHORT, 6)
    assert torch.equal(padded, alone), (padded.to(torch.int32) - alone.to(torch.int32)).abs().max()
