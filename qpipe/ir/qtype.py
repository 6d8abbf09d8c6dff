"""The quantized type of an integer tensor, as first-class node metadata.

Every integer tensor of the integer graph carries ``meta["qtype"]``: its bit
width and the real scale of one integer step (zero point always 0: qpipe is
symmetric). ``unsigned``: the codes lie on ``[0, 2**bits - 1]`` (a ReLU output,
stored as uint8); otherwise on the signed range of ``bits``. Accumulators and per-channel weights have one scale per channel
along ``axis``. The substitution pass writes it, the verifier checks that each
op's output scale follows from its inputs' scales and its dyadic pair, and the
backends (ONNX QDQ, TensorRT) read scales from it and nowhere else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from torch.fx import Node

QTYPE = "qtype"


@dataclass(frozen=True)
class QType:
    bits: int
    scale: Union[float, tuple[float, ...]]
    axis: Optional[int] = None  # the channel axis of a per-channel scale
    zero_point: int = 0
    unsigned: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 64:
            raise ValueError(f"qtype bits must be in 2..64, got {self.bits}")
        if self.zero_point != 0:
            raise ValueError("qpipe quantization is symmetric: zero point 0")
        scales = self.scales
        if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
            raise ValueError(f"qtype scales must be finite and > 0, got {self.scale!r}")
        if isinstance(self.scale, tuple) and self.axis is None and len(self.scale) > 1:
            raise ValueError("a per-channel qtype needs its channel axis")

    @classmethod
    def of(cls, bits: int, scale: Union[float, Sequence[float]], axis: Optional[int] = None) -> "QType":
        """Per tensor for one value, per channel along ``axis`` for a sequence."""
        if isinstance(scale, (int, float)):
            return cls(int(bits), float(scale))
        values = tuple(float(s) for s in scale)
        if len(values) == 1:
            return cls(int(bits), values[0])
        return cls(int(bits), values, axis)

    @property
    def max_abs(self) -> int:
        """The largest ``|code|`` a tensor of this type can hold (what an accumulator bound multiplies)."""
        return (1 << self.bits) - 1 if self.unsigned else 1 << (self.bits - 1)

    @property
    def per_channel(self) -> bool:
        return isinstance(self.scale, tuple)

    @property
    def scales(self) -> tuple[float, ...]:
        return self.scale if isinstance(self.scale, tuple) else (float(self.scale),)

    def __str__(self) -> str:
        if self.per_channel:
            first = self.scales[0]
            return f"q{self.bits}<{first:.6g}.. x{len(self.scales)} @{self.axis}>"
        return f"{'u' if self.unsigned else 'q'}{self.bits}<{self.scale:.6g}>"


def qtype_of(node: Node) -> Optional[QType]:
    value = node.meta.get(QTYPE)
    return value if isinstance(value, QType) else None


def set_qtype(node: Node, qtype: QType) -> None:
    node.meta[QTYPE] = qtype
