"""Which CPU kernel runs each qpipe op (see :mod:`.cpu` for why each is exact)."""
from __future__ import annotations

import contextlib
from typing import Any, Optional

from qpipe.backends._torch_int8 import cpu, cpu_ext


class CpuBackend:
    def __init__(self, use_ext: bool = True):
        self.ext = cpu_ext.get() if use_ext else None

    def context(self):
        return cpu.ieee_fp32()

    def make(self, op: str, a: dict[str, Any], x_bits: int, x_unsigned: bool = False) -> Optional[tuple]:
        """(callable, names of its tensor inputs, kernel description) or None for the reference kernel."""
        tail = "" if self.ext is not None else " (no C++: torch requant)"
        if op in ("conv1d_rq", "conv2d_rq", "conv1d_acc", "conv2d_acc"):
            k = cpu.Conv(self.ext, a, x_bits, fused=op.endswith("_rq"), x_unsigned=x_unsigned)
            return k, ["x"], k.kind + tail
        if op in ("linear_rq", "linear_acc"):
            k = cpu.Linear(self.ext, a, x_bits, fused=op == "linear_rq", x_unsigned=x_unsigned)
            return k, ["x"], k.kind + tail
        if op == "add_requant":
            k = cpu.AddRequant(self.ext, a)
            return k, ["a", "b"], "add-rq" + ("-c++" if k.ext is not None else "-torch")
        if op == "quantize":
            k = cpu.Quantize(self.ext, a)
            return k, ["x"], "quantize-c++" if k.ext is not None else "reference"
        if op == "clamp_int":
            lo, hi = int(a["lo"]), int(a["hi"])
            return (lambda x: x.clamp(lo, hi)), ["x"], "clamp"
        return None
