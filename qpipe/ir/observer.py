"""Activation observers: identity modules that record ranges during calibration.

They live in the graph as ``call_module`` nodes between the observed stage and
the integer stage. What they measured is copied into the node's
``meta["qparams"]`` by the calibration passes, so later passes read numbers from
the graph, not from module state.
"""
from __future__ import annotations

import math

import torch


class ActObserver(torch.nn.Module):
    """Per-tensor symmetric range observer (min/max or a percentile of |x|).

    With several calibration batches, each batch's range is kept and the mean is
    used (a moving-average observer); one batch, the Q-ASR default, is exact.
    """

    qpipe_observer = True
    qpipe_identity = True

    def __init__(self, method: str = "minmax", percentile: float = 100.0, bits: int = 8, unsigned: bool = False):
        super().__init__()
        self.method = method
        self.percentile = float(percentile)
        self.bits = int(bits)
        self.unsigned = bool(unsigned)
        self.recording = False
        self.counting_scale: float | None = None
        self.amax: list[float] = []
        self.mins: list[float] = []
        self.maxs: list[float] = []
        self.saturated = 0
        self.total = 0

    def reset(self) -> None:
        self.amax, self.mins, self.maxs = [], [], []
        self.saturated = self.total = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recording:
            with torch.no_grad():
                flat = x.detach().abs().flatten().to(torch.float32)
                self.mins.append(float(x.min()))
                self.maxs.append(float(x.max()))
                if self.method == "percentile" and self.percentile < 100.0 and flat.numel() > 1:
                    k = max(1, min(flat.numel(), int(math.ceil(flat.numel() * self.percentile / 100.0))))
                    self.amax.append(float(flat.kthvalue(k).values))
                else:
                    self.amax.append(float(flat.max()))
        elif self.counting_scale is not None:
            with torch.no_grad():
                limit = self.counting_scale * self.top_code()
                self.saturated += int((x.detach().abs() > limit * (1 + 1e-6)).sum())
                self.total += x.numel()
        return x

    def range_amax(self) -> float:
        if not self.amax:
            raise ValueError("observer saw no data")
        return sum(self.amax) / len(self.amax)

    def top_code(self) -> int:
        """The code ``amax`` maps to: 2**(bits-1) - 1 (symmetric), or 2**bits - 1 for a never-negative tensor."""
        return (1 << self.bits) - 1 if self.unsigned else (1 << (self.bits - 1)) - 1

    def scale(self) -> float:
        amax = self.range_amax()
        return (amax if amax > 0 else 1e-8) / self.top_code()

    def extra_repr(self) -> str:
        unsigned = ", unsigned" if self.unsigned else ""
        return f"method={self.method}, percentile={self.percentile}, bits={self.bits}{unsigned}"
