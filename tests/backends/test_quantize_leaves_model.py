"""quantize() works on a copy: the model it was given is the same after a failed and a good run."""
from __future__ import annotations

import pytest
import torch

from conftest import FAST_PIPELINE
from qpipe.api import quantize
from qpipe.ir import print_ir
from qpipe.ir.errors import QpipeError
from qpipe.ir.passes import register
from qpipe.ir.stages import Stage, graph_stage


@register("explode-after-fold-for-backends-test", needs=Stage.FOLDED)
def _explode(gm, ctx):
    """Fails mid-way, after fold-bn has changed the graph."""
    raise RuntimeError("boom")


def test_quantize_does_not_change_the_float_model(tiny_float_model):
    fm = tiny_float_model
    before = print_ir(fm.gm, with_provenance=True)
    params = {k: v.clone() for k, v in fm.gm.state_dict().items()}
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        ref = fm.gm(x)

    with pytest.raises(QpipeError, match="explode-after-fold-for-backends-test"):
        quantize(fm, "fold-bn,explode-after-fold-for-backends-test", progress=False)
    assert print_ir(fm.gm, with_provenance=True) == before

    result = quantize(fm, FAST_PIPELINE, progress=False)  # the same FloatModel again, after the failure
    assert str(graph_stage(result.gm)) == "integer"
    assert result.float_model is fm and result.gm is not fm.gm
    assert print_ir(fm.gm, with_provenance=True) == before
    assert str(graph_stage(fm.gm)) == "float"
    state = fm.gm.state_dict()
    assert state.keys() == params.keys() and all(torch.equal(state[k], params[k]) for k in params)
    with torch.no_grad():
        assert torch.equal(fm.gm(x), ref)
    assert result.metrics["logprob_sqnr_db"] > 20
