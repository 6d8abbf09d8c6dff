"""``--target tensorrt``: a TensorRT engine built from the integer graph's QDQ model.

TensorRT's explicit quantization reads Q/DQ pairs and fuses them into its int8
kernels; the QDQ placement is the ``tensorrt`` layout of
:mod:`qpipe.backends.onnx_qdq` (int8 activations at zero point 0, per-channel
int8 weights on axis 0, ReLU in float before its QuantizeLinear, a float head
that the runner rounds back onto the reference's int16 grid). This target writes
that model (``model_tensorrt.onnx``) and the engine built from it
(``model.plan``) with one optimization profile over batch and time.

An engine is specific to the GPU and TensorRT version that built it, so the
target needs both where the folder is written and where it runs; without them
``available()`` says in one line which is missing and nothing is written.
TensorRT rounds its requantization in float (half to even), not with qpipe's
dyadic round-half-up, so its logits may differ from the reference by a step
where a value lies on a rounding boundary: it is a fast target, not a
bit-exact one (the onnx-qdq target is the exact one).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import torch
from torch.fx import GraphModule

from qpipe.backends.onnx_qdq import INPUT_NAME, export_onnx
from qpipe.backends.target import SaveRecord, Target, register_target
from qpipe.ir.errors import QpipeError

ONNX_FILE = "model_tensorrt.onnx"
ENGINE_FILE = "model.plan"
MAX_BATCH_ENV = "QPIPE_TRT_MAX_BATCH"
MAX_FRAMES_ENV = "QPIPE_TRT_MAX_FRAMES"
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_FRAMES = 4096  # 41 s of audio at NeMo's 10 ms hop


def tensorrt_missing() -> Optional[str]:
    """None when TensorRT and a CUDA GPU are both here, else one line saying which is missing."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed (pip install tensorrt, on a machine with an NVIDIA GPU)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch (TensorRT builds and runs engines on a GPU)"
    return None


def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def build_engine(onnx_path: str, engine_path: str, input_shape: list[int], time_dim: Optional[int],
                 time_multiple: int = 1) -> None:
    """Parse the QDQ model and serialize an engine with one profile over batch (and time)."""
    import tensorrt as trt

    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as f:
        if not parser.parse(f.read()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise QpipeError(f"tensorrt: the ONNX parser rejected {os.path.basename(onnx_path)}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ nodes select int8 kernels (explicit quantization)
    max_batch = int(os.environ.get(MAX_BATCH_ENV, DEFAULT_MAX_BATCH))
    max_frames = int(os.environ.get(MAX_FRAMES_ENV, DEFAULT_MAX_FRAMES))
    lo, opt, hi = list(input_shape), list(input_shape), list(input_shape)
    lo[0], opt[0], hi[0] = 1, min(8, max_batch), max_batch
    if time_dim is not None:
        d = time_dim % len(input_shape)
        step = max(1, time_multiple)
        lo[d] = step * max(1, -(-16 // step))
        opt[d] = max(lo[d], input_shape[d])
        hi[d] = max(opt[d], max_frames - max_frames % step)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise QpipeError("tensorrt: the engine build failed (see TensorRT's log above)")
    with open(engine_path, "wb") as f:
        f.write(bytes(plan))


class TensorRTRunner:
    """A serialized engine: float features (B, F, T) -> integer logits on the reference's grid."""

    def __init__(self, engine_path: str, output_scale: float, output_bits: int = 16):
        missing = tensorrt_missing()
        if missing:
            raise QpipeError(f"target 'tensorrt' cannot run here: {missing}")
        import tensorrt as trt

        self.runtime = trt.Runtime(_logger())
        with open(engine_path, "rb") as f:
            self.engine = self.runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise QpipeError(f"{engine_path}: TensorRT could not load this engine (built by another GPU or version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.output_scale = float(output_scale)
        self.output_bits = output_bits

    def real_logits(self, features: torch.Tensor) -> torch.Tensor:
        x = features.detach().to("cuda", torch.float32).contiguous()
        self.context.set_input_shape(INPUT_NAME, tuple(x.shape))
        y = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), device="cuda", dtype=torch.float32)
        self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
        self.context.set_tensor_address(self.output_name, y.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise QpipeError("tensorrt: the engine failed to run on this input")
        stream.synchronize()
        return y

    def logits_int(self, features: torch.Tensor) -> torch.Tensor:
        y = self.real_logits(features).double().cpu().numpy()
        hi = (1 << (self.output_bits - 1)) - 1
        q = np.clip(np.floor(y / self.output_scale + 0.5), -hi, hi)
        return torch.from_numpy(q.astype(np.int16 if self.output_bits <= 16 else np.int32))

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits_int(features)


@register_target
class TensorRTTarget(Target):
    """``OUT/model.plan`` (+ the QDQ model it was built from); needs TensorRT and a GPU."""

    name = "tensorrt"
    summary = "TensorRT engine (model.plan) built from the QDQ model by TensorRT's explicit quantization"
    files = (ONNX_FILE, ENGINE_FILE)
    pass_defaults = {"insert-observers": {"unsigned_relu": False}}  # TensorRT has no uint8

    def available(self) -> tuple[bool, str]:
        missing = tensorrt_missing()
        return missing is None, missing or ""

    def write(self, folder: str, gm: GraphModule, record: SaveRecord, example: torch.Tensor) -> None:
        onnx_path = os.path.join(folder, ONNX_FILE)
        export_onnx(gm, onnx_path, "tensorrt")
        build_engine(onnx_path, os.path.join(folder, ENGINE_FILE), list(example.shape), record.time_dim,
                     record.time_multiple)

    def load(self, folder: str, meta: dict[str, Any]) -> TensorRTRunner:
        outputs = meta.get("outputs") or [{}]
        scale = outputs[0].get("scale")
        if scale is None:
            raise QpipeError(f"{folder}: qpipe.json has no output scale; re-run qpipe -o with --target tensorrt")
        return TensorRTRunner(os.path.join(folder, ENGINE_FILE), scale, int(outputs[0].get("bits", 16)))
