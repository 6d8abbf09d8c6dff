"""``torch-int8``: the integer program, fast in PyTorch, bit-exact with ``reference``.

``write`` stores the integer graph as a *plan* (``model.ti8.pt``: the graph's
integer tensors and its calls in order, read through each op's ``OpSpec``; see
``_torch_int8/plan.py``); ``load`` reads it with ``torch.load(weights_only=True)``
(no pipeline, no fx, no NeMo) and picks kernels for the machine it runs on:

* CPU: activations stored channels-last; pointwise convolutions and linears on
  oneDNN's int8 matmul (AMX/VNNI) or ``torch._int_mm``; depthwise and other
  convolutions as fp32 channels-last oneDNN convolutions, exact because every
  accumulator is proven below 2**24; requantization and residual adds in small C++
  kernels (``_torch_int8/cpu_kernels.cpp``, built once where a compiler exists,
  else the same integers in torch ops).
* CUDA (``device="cuda"``, or ``QPIPE_TORCH_INT8_DEVICE=cuda``): ``torch._int_mm``
  (cuBLASLt) and Triton kernels for the depthwise convolution and requantization,
  replayed as one CUDA graph per input shape (``_torch_int8/cuda_graph.py``;
  ``cuda_graphs=False`` runs them eagerly); where there is no CUDA it says so in one line.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch.fx import GraphModule

from qpipe.backends.target import SaveRecord, Target, register_target
from qpipe.ir.errors import QpipeError

MODEL_FILE = "model.ti8.pt"
DEVICE_ENV = "QPIPE_TORCH_INT8_DEVICE"


class TorchInt8Runner:
    """float features (B, F, T) -> the reference's integer logits; ``program.kernels`` says what runs."""

    def __init__(self, program):
        self.program = program

    @property
    def device(self) -> torch.device:
        return self.program.device

    def logits_int(self, features: torch.Tensor) -> torch.Tensor:
        out = self.program(features)
        return out.cpu() if isinstance(out, torch.Tensor) else out


def check_device(device: str | torch.device) -> torch.device:
    """The device, or one QpipeError line saying why it cannot run here."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise QpipeError("torch-int8: CUDA requested but torch.cuda.is_available() is False on this machine (no GPU or a CPU-only torch)")
    elif dev.type != "cpu":
        raise QpipeError(f"torch-int8: no kernels for device '{dev}' (cpu or cuda)")
    return dev


def _on_device(program, cuda_graphs: bool):
    """On CUDA, the program replayed from CUDA graphs unless ``cuda_graphs`` is False; elsewhere as it is."""
    if program.device.type != "cuda" or not cuda_graphs:
        return program
    from qpipe.backends._torch_int8.cuda_graph import CudaGraphed

    return CudaGraphed(program)


def program_from_graph(gm: GraphModule, device: str | torch.device = "cpu", use_ext: bool = True,
                       kernels: Optional[str] = None, cuda_graphs: bool = True):
    """The fast program of an integer graph, without writing a folder (tests, benchmarks); ``kernels``: see
    :class:`~qpipe.backends._torch_int8.program.Program`."""
    from qpipe.backends._torch_int8.plan import plan_from_graph
    from qpipe.backends._torch_int8.program import Program

    return _on_device(Program(plan_from_graph(gm), check_device(device), use_ext=use_ext, kernels=kernels), cuda_graphs)


def load_program(folder: str, device: Optional[str | torch.device] = None, use_ext: bool = True,
                 cuda_graphs: bool = True):
    from qpipe.backends._torch_int8.program import Program

    dev = check_device(device or os.environ.get(DEVICE_ENV) or "cpu")
    plan = torch.load(os.path.join(folder, MODEL_FILE), weights_only=True)
    return _on_device(Program(plan, dev, use_ext=use_ext), cuda_graphs)


@register_target
class TorchInt8Target(Target):
    name = "torch-int8"
    summary = "the integer program in PyTorch: int8 GEMMs, exact fp32 depthwise, C++ requant (model.ti8.pt; CPU, CUDA; bit-exact)"
    files = (MODEL_FILE,)

    def write(self, folder: str, gm: GraphModule, record: SaveRecord, example: torch.Tensor) -> None:
        from qpipe.backends._torch_int8.plan import plan_from_graph

        torch.save(plan_from_graph(gm), os.path.join(folder, MODEL_FILE))

    def load(self, folder: str, meta: dict[str, Any]) -> TorchInt8Runner:
        return TorchInt8Runner(load_program(folder))
