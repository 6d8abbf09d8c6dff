"""The tensorrt target: one clear line where TensorRT or a GPU is missing; the engine build it asks for.

Neither TensorRT nor a GPU is on the machines these tests run on. What can be
checked here: the target says what is missing and writes nothing, and, against a
recording stand-in for TensorRT's builder API, that it parses the ``tensorrt``
QDQ layout and builds with int8 and a profile covering dynamic batch and time.
Whether the engine runs and how close its logits come is only measurable on a GPU.
"""
from __future__ import annotations

import subprocess
import sys
import types

import onnx
import pytest
import torch

from conftest import FAST_PIPELINE, TinyASR
from qpipe.api import quantize
from qpipe.backends import get_target, list_targets
from qpipe.backends import tensorrt as trt_target
from qpipe.ir.errors import QpipeError


def test_unavailable_without_tensorrt_says_what_is_missing_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    ok, why = get_target("tensorrt").available()
    assert not ok and "tensorrt" in why and "\n" not in why
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, why = get_target("tensorrt").available()
    assert not ok and "GPU" in why and "\n" not in why
    assert "tensorrt" in [t.name for t in list_targets()]


def test_quantize_to_tensorrt_fails_before_any_work_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    from qpipe.frontends.torch import from_module

    fm = from_module(TinyASR().eval(), (torch.randn(1, 8, 32),))
    out = tmp_path / "out"
    with pytest.raises(QpipeError, match=r"^target 'tensorrt' is not available here: the tensorrt Python package"):
        quantize(fm, FAST_PIPELINE, output=str(out), target="tensorrt", progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_tensorrt_is_one_line_exit_2(tmp_path):
    if trt_target.tensorrt_missing() is None:
        pytest.skip("TensorRT and a GPU are present here")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "qpipe.cli", "no-model-needed.nemo", "-o", str(out), "--target", "tensorrt"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qpipe: error: target 'tensorrt' is not available here"), proc.stderr
    assert not out.exists()


class _Recorder:
    """Stands in for the few TensorRT classes the build touches, and records what was asked."""

    def __init__(self):
        self.calls = {}

    def module(self) -> types.ModuleType:
        rec = self
        m = types.ModuleType("tensorrt")

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                rec.calls["profile"] = (name, list(lo), list(opt), list(hi))

        class Config:
            def set_flag(self, flag):
                rec.calls.setdefault("flags", []).append(flag)

            def add_optimization_profile(self, p):
                rec.calls["profiles"] = rec.calls.get("profiles", 0) + 1

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return "network"

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"engine bytes"

        class OnnxParser:
            def __init__(self, network, logger):
                self.num_errors = 0

            def parse(self, data):
                rec.calls["onnx"] = onnx.load_from_string(data)
                return True

        m.Logger, m.Builder, m.OnnxParser = Logger, Builder, OnnxParser
        m.BuilderFlag = types.SimpleNamespace(INT8="INT8")
        return m


def test_engine_build_reads_the_tensorrt_qdq_layout_with_int8_and_a_dynamic_profile(tmp_path, monkeypatch):
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", rec.module())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from qpipe.frontends.torch import from_module

    torch.manual_seed(0)
    fm = from_module(TinyASR().eval(), (torch.randn(2, 8, 32),))
    out = tmp_path / "out"
    quantize(fm, FAST_PIPELINE, output=str(out), target="tensorrt", progress=False)
    assert (out / "model.plan").read_bytes() == b"engine bytes"
    assert (out / "model_tensorrt.onnx").exists()
    assert rec.calls["flags"] == ["INT8"] and rec.calls["profiles"] == 1
    name, lo, opt, hi = rec.calls["profile"]
    assert name == "features" and lo[1] == opt[1] == hi[1] == 8  # the feature axis is fixed
    assert lo[0] == 1 and hi[0] >= opt[0] >= 1  # batch and time are ranges
    assert lo[2] <= 32 <= hi[2] and hi[2] >= 4096 - 1
    model = rec.calls["onnx"]  # what TensorRT parsed: the explicit-quantization layout, no ORT-only ops
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert not {"ConvInteger", "QLinearConv", "Mod"} & ops
