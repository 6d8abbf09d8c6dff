"""The printer is deterministic and readable; the verifier's tables catch what they should."""
from __future__ import annotations

import pytest
import torch
from torch.testing import FileCheck

from conftest import TinyASR
from qpipe.frontends.torch import from_module
from qpipe.ir import QpipeError, Stage, print_ir, verify
from qpipe.ir.stages import set_graph_stage


def _fm():
    torch.manual_seed(0)
    return from_module(TinyASR().eval(), (torch.randn(2, 8, 32),))


def test_printing_is_deterministic_across_exports():
    assert print_ir(_fm().gm) == print_ir(_fm().gm)


def test_printed_lines_have_dtype_shape_and_provenance():
    text = print_ir(_fm().gm, with_provenance=False)
    FileCheck().check("// stage: float").check("%dw_weight = get_attr[dw.weight] : f32[8,1,5]") \
        .check("%x = input : f32[B,8,T]").check("= aten.conv1d(%x, %dw_weight, None, [1], [2], [1], 8) : f32[B,8,T]") \
        .check("return [%log_softmax]").run(text)


def test_verifier_float_stage_accepts_export_and_folded_rejects_bn():
    fm = _fm()
    verify(fm.gm, Stage.FLOAT)
    with pytest.raises(QpipeError) as exc:
        verify(fm.gm, Stage.FOLDED)
    assert str(exc.value).count("BatchNorm left unfolded") == 3


def test_verifier_integer_stage_needs_a_quantizer():
    fm = _fm()
    set_graph_stage(fm.gm, Stage.INTEGER)
    with pytest.raises(QpipeError, match="no input quantizer"):
        verify(fm.gm, Stage.INTEGER)
