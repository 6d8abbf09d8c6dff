"""The two kinds of value the onnx-qdq builder passes between lowerings.

They live apart from :mod:`qpipe.backends.onnx_qdq` so that lowerings in other
modules (:mod:`qpipe.backends.onnx.islands`) can build and read them without
importing the builder.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class QCodes:
    """Integer codes in ONNX: ``real = (code - zp) * scale`` (per tensor)."""

    name: str
    scale: float
    zp: int
    elem: int  # onnx TensorProto element type
    bits: int
    lo: int = -(1 << 15)  # the range of the codes, in qpipe's units (after qpipe's clamp)
    hi: int = (1 << 15) - 1


@dataclass
class Real:
    """A real-valued float32 tensor (a dequantized activation or an accumulator)."""

    name: str
