"""tools/bench/torch_int8_cuda_check.py's kit mode, the one a GPU machine without NeMo runs: here on CPU
tensors with the CUDA kernels (Triton interpreted), on a kit made by hand from the toy model."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from conftest import FAST_PIPELINE, TinyASR

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A kit of the toy model: its plan, two batches of inputs and the reference's logits for them."""
    from qpipe.api import quantize
    from qpipe.frontends.torch import from_module

    torch.manual_seed(0)
    fm = from_module(TinyASR().eval(), (torch.randn(2, 8, 32),))
    root = tmp_path_factory.mktemp("kit")
    out = str(root / "folder")
    result = quantize(fm, FAST_PIPELINE, output=out, target="torch-int8", progress=False)
    d = root / "kit" / "tiny"
    d.mkdir(parents=True)
    (d / "model.ti8.pt").write_bytes(open(os.path.join(out, "model.ti8.pt"), "rb").read())
    for b in (1, 3):
        x = torch.randn(b, 8, 40, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            torch.save({"x": x, "want": result.gm(x)}, d / f"batch{b}.pt")
    return root / "kit"


def test_kit_runs_the_cuda_kernels_bit_exactly_and_times_the_float_twin(kit, tmp_path, capsys):
    from torch_int8_cuda_check import run_kit

    if not torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("Triton kernels cannot run on CPU tensors without TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    out = tmp_path / "cuda.json"
    assert run_kit(str(kit), "cpu", 2, str(out)) == 0
    report = json.loads(out.read_text())
    row = report["models"]["tiny"]
    assert report["bit_exact_everywhere"] and row["bit_exact"] == {"1": True, "3": True}
    assert any(k.startswith("cuda") for k in row["kernels"]) and row["batch"] == 3
    assert set(row["median_ms"]) == {"torch fp32 (float twin)", "qpipe torch-int8 CUDA eager"}  # fp16 and graphs only on a GPU
    assert all(v > 0 for v in row["median_ms"].values())
    assert "bit-exact on every model and batch: True" in capsys.readouterr().out


def test_kit_says_when_the_logits_differ(kit, tmp_path):
    from torch_int8_cuda_check import run_kit

    if not torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("Triton kernels cannot run on CPU tensors without TRITON_INTERPRET=1")
    bad = tmp_path / "kit" / "tiny"
    bad.mkdir(parents=True)
    (bad / "model.ti8.pt").write_bytes((kit / "tiny" / "model.ti8.pt").read_bytes())
    data = torch.load(kit / "tiny" / "batch1.pt", weights_only=True)
    data["want"] = data["want"].contiguous().clone()
    data["want"].view(-1)[0] += 1  # one logit off by one step
    torch.save(data, bad / "batch1.pt")
    assert run_kit(str(tmp_path / "kit"), "cpu", 1, None) == 1


def test_float_twin_has_the_plans_convolutions():
    from torch_int8_cuda_check import float_twin

    plan = {"input": "x", "output": [{"ref": "y"}], "tensors": {"w": torch.zeros(4, 1, 3, dtype=torch.int8)},
            "steps": [{"fn": "qpipe.quantize", "out": "q", "args": {"x": {"ref": "x"}}},
                      {"fn": "qpipe.conv1d_rq", "out": "y", "args": {"x": {"ref": "q"}, "w": {"tensor": "w"}, "stride": [1],
                                                                     "padding": [1], "dilation": [1], "groups": 4, "lo": 0}}]}
    twin = float_twin(plan)
    y = twin(torch.randn(2, 4, 9))
    assert y.shape == (2, 4, 9) and bool((y >= 0).all())  # the ReLU of an op clamped at 0
    assert [tuple(p.shape) for p in twin.parameters()] == [(4, 1, 3)]
