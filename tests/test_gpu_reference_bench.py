"""tools/bench/gpu_reference.py, run on the CPU: the GPU machine gets one try a session."""
from __future__ import annotations

import importlib.util
import json
import os

import torch

from conftest import FAST_PIPELINE, TinyASR
from qpipe.api import quantize

_PATH = os.path.join(os.path.dirname(__file__), "..", "tools", "bench", "gpu_reference.py")
_spec = importlib.util.spec_from_file_location("gpu_reference", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

_DYN = ({0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO},)


def test_moved_takes_every_tensor_of_the_integer_program_along():
    gm = quantize(TinyASR().eval(), passes=FAST_PIPELINE, example_inputs=(torch.randn(2, 8, 32),),
                  progress=False).gm
    moved = bench._moved(gm, "meta")
    left = [n for m in moved.modules() for n, v in list(vars(m).items()) + list(m.named_buffers())
            if isinstance(v, torch.Tensor) and v.device.type != "meta"]
    assert not left
    y = moved(torch.randn(1, 8, 40, device="meta"))
    assert y.device.type == "meta" and y.dtype == gm(torch.randn(1, 8, 40)).dtype
    # the original stays on the CPU
    assert all(p.device.type == "cpu" for p in gm.parameters())


def test_run_quantizes_on_the_spot_from_fp16_stored_weights(tmp_path, monkeypatch):
    ep = torch.export.export(TinyASR().eval(), (torch.randn(2, 8, 32),), dynamic_shapes=_DYN)
    bench.cast_weights(ep, torch.float16)
    assert all(v.dtype == torch.float16 for v in ep.state_dict.values() if v.is_floating_point())
    torch.export.save(ep, str(tmp_path / "float.pt2"))
    (tmp_path / "prepared.json").write_text(json.dumps(
        {"source": "tiny", "feat_in": 8, "torch": torch.__version__, "float_weights_stored": "fp16"}))
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    assert bench._run(str(tmp_path), str(tmp_path / "r.json"), repeats=2, batches=(1, 3)) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["float_weights_stored"] == "fp16" and r["quantized_in"].startswith("run")
    assert [row["batch"] for row in r["rows"]] == [1, 3]
    assert all(row["int_logits_cuda_equal_cpu"] for row in r["rows"])
    assert all(row["integer_reference_cuda"]["median_ms"] > 0 for row in r["rows"])
