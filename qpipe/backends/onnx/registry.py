"""The two registries of onnx-qdq lowerings and their decorators (see :mod:`qpipe.backends.onnx.islands`,
which imports every family module so that they are filled). Apart from ``islands`` so that the
family modules register without importing it (no import cycle)."""
from __future__ import annotations

from typing import Callable

LOWERINGS: dict[str, Callable] = {}
ATEN_LOWERINGS: dict[object, Callable] = {}


def lowering(*names: str) -> Callable:
    """Register ``fn(builder, node, spec)`` as the onnx-qdq lowering of the qpipe ops ``names``."""

    def wrap(fn: Callable) -> Callable:
        for name in names:
            if name in LOWERINGS:
                raise ValueError(f"onnx-qdq: a second lowering of qpipe.{name}")
            LOWERINGS[name] = fn
        return fn

    return wrap


def aten_lowering(*targets) -> Callable:
    """Register ``fn(builder, node)`` as the onnx-qdq lowering of the ATen overloads ``targets``."""

    def wrap(fn: Callable) -> Callable:
        for t in targets:
            if t in ATEN_LOWERINGS:
                raise ValueError(f"onnx-qdq: a second lowering of {t}")
            ATEN_LOWERINGS[t] = fn
        return fn

    return wrap
