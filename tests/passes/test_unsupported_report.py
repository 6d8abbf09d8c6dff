"""The unsupported-op report names every op of the model that has no op family, including
ops after a tuple-returning op (``q, k, v = x.chunk(3)``: attention went unreported once)."""
from __future__ import annotations

import pytest
import torch

from qpipe.frontends.torch import from_module
from qpipe.ir import QpipeError
from qpipe.ir.passes import run_pipeline
from qpipe.passes.lower import unsupported_ops


class TinyAttention(torch.nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, F, T)
        h = x.transpose(1, 2)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        attn = torch.cumsum(q @ k.transpose(1, 2), dim=-1)  # no integer kernel (softmax, matmul, LayerNorm have one)
        return self.out(torch.flip(attn @ v, (1,)))


def test_ops_after_a_tuple_returning_op_are_reported():
    fm = from_module(TinyAttention().eval(), (torch.randn(2, 8, 16),))
    report = unsupported_ops(fm.gm)
    assert any("chunk" in op or "split" in op for op in report), report
    assert "aten.cumsum" in report and "aten.flip" in report, report
    assert not any(op.startswith(("aten.linear", "aten.transpose", "aten.matmul")) for op in report), report
    with pytest.raises(QpipeError, match=r"no integer kernel yet: .*aten\.cumsum x1"):
        run_pipeline(fm.gm, "fold-bn,insert-observers", state=fm.pipeline_state(), progress=False)
