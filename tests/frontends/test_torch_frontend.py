"""The torch frontend: any nn.Module or ExportedProgram becomes a float graph with a dynamic time axis."""
from __future__ import annotations

import torch
from torch.testing import FileCheck

from conftest import FAST_PIPELINE, TinyASR
from qpipe.api import quantize
from qpipe.frontends.torch import from_exported_program, from_module
from qpipe.ir import print_ir


def test_module_exports_with_symbolic_batch_and_time():
    module = TinyASR().eval()
    fm = from_module(module, (torch.randn(2, 8, 32),))
    text = print_ir(fm.gm)
    FileCheck().check("%x = input : f32[B,8,T]").check("aten.conv1d").check("aten.batch_norm").check("return").run(text)
    x = torch.randn(3, 8, 77)
    torch.testing.assert_close(fm.gm(x), module(x))


def test_exported_program_is_accepted_and_quantizes():
    module = TinyASR().eval()
    ep = torch.export.export(module, (torch.randn(2, 8, 32),), dynamic_shapes=({0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO},))
    fm = from_exported_program(ep)
    result = quantize(fm, passes=FAST_PIPELINE, progress=False)
    y = result.gm(torch.randn(1, 8, 50))
    assert y.dtype == torch.int16 and y.shape == (1, 50, 6)
    assert result.metrics["argmax_agreement"] > 0.8


def test_module_through_api_with_example_inputs():
    result = quantize(TinyASR().eval(), passes=FAST_PIPELINE, example_inputs=(torch.randn(2, 8, 32),), progress=False)
    assert "log-prob SQNR" in result.report
