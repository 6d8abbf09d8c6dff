"""onnx-qdq lowerings of the Conformer / Citrinet ops (softmax, LayerNorm, gates, matmul, ...).

A lowering is ``fn(builder, node, spec) -> QCodes | Real`` registered in
:data:`LOWERINGS` under the qpipe op's name; the builder
(:class:`qpipe.backends.onnx_qdq._Builder`) calls it for every op it has no
lowering of its own for; ``fn(builder, node)`` in :data:`ATEN_LOWERINGS`, keyed
by the ATen overload, for layout ops the builder does not know. Each records in ``builder.islands`` whether it wrote
the op integer-exact or as a named float island.
"""
from __future__ import annotations

from typing import Callable

LOWERINGS: dict[str, Callable] = {}
ATEN_LOWERINGS: dict[object, Callable] = {}
