"""onnx-qdq lowerings of the Conformer / Citrinet ops (softmax, LayerNorm, gates, matmul, ...).

A lowering is ``fn(builder, node, spec) -> QCodes | Real`` registered in
:data:`LOWERINGS` under the qpipe op's name (``@lowering`` / ``@aten_lowering`` of
:mod:`qpipe.backends.onnx.registry`); the builder
(:class:`qpipe.backends.onnx_qdq._Builder`) calls it for every op it has no
lowering of its own for; ``fn(builder, node)`` in :data:`ATEN_LOWERINGS`, keyed
by the ATen overload, for the ATen ops the builder does not know (and the
symbolic slice it does not). Each records in ``builder.islands`` whether it
wrote the op integer-exact or as a named float island
(:data:`~qpipe.backends.onnx.codes.INTEGER`, :data:`~qpipe.backends.onnx.codes.FLOAT_ISLAND`).

One module per op family, as in :mod:`qpipe.ir.ops`. With the 8-bit inputs the
default pipeline gives them, every op is written integer-exact; a float island
(``DequantizeLinear`` -> the float ONNX op -> ``QuantizeLinear`` at the op's
output qtype) is the fallback for a wider input of a nonlinearity:

======================  =======================================  ============================================
module                  ops                                      written as
======================  =======================================  ============================================
``elementwise``         ``scale_rq``, ``masked_fill_int``,       integer: int64 arithmetic + the exact dyadic
                        ``pad_int``                              requant; ``Where`` / ``Pad`` on the codes
``matmul``              ``matmul_rq``, ``matmul_acc``            integer: ``MatMulInteger`` + exact requant
``mul``                 ``mul_requant``                          integer: int64 product + exact requant
``mean``                ``mean_int``                             integer: ``ReduceSum`` + exact rounding division
``softmax``             ``softmax_int``, ``masked_softmax_int``  integer: max-subtraction, the i-exp as a table
                                                                 ``Gather``, exact division; wider input: float
                                                                 island DQ -> ``Softmax`` -> Q
``layernorm``           ``layer_norm_core``                      integer: int64 sums, an exact isqrt (float64
                                                                 root corrected against int64 squares), division
``sigmoid``             ``sigmoid_int``, ``silu_int``,           integer: a table of the kernel over the 256
                        ``glu_int``                              codes (GLU: of its Q15 gate); wider input:
                                                                 float island with ``Sigmoid``
``gelu``                ``gelu_int``                             integer: a table; wider: float island of the
                                                                 kernel's erf polynomial
``shapes``              ATen ops on masks, lengths, sizes;       plain ONNX on bool / int64 / float tensors that
                        ``slice`` with symbolic bounds           are not activations; slices of codes
``constants``           integer constants read as inputs         their codes (``lifted`` around an export)
======================  =======================================  ============================================

Integer-exact means bit-exact with the reference kernel on every input
(``tests/backends/test_onnx_islands.py`` checks it on random codes); a float
island is within a step or so of it (measured there, and on the demo Conformer).
"""
from __future__ import annotations

from qpipe.backends.onnx.registry import ATEN_LOWERINGS, LOWERINGS  # noqa: F401  (the builder's seam)


def summary(gm, islands: dict[str, str]) -> dict[str, dict]:
    """``{op: {"written": "integer" | "float island", "count": nodes of op in gm}}`` for ``qpipe.json``."""
    from qpipe.ir.opspec import spec_of

    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        spec = spec_of(node) if node.op == "call_function" else None
        if spec is not None and spec.name in islands:
            counts[spec.name] = counts.get(spec.name, 0) + 1
    return {op: {"written": how, "count": counts.get(op, 0)} for op, how in sorted(islands.items())}


# the family modules register themselves (into registry.py)
from qpipe.backends.onnx import (  # noqa: E402,F401
    constants, elementwise, gelu, layernorm, matmul, mean, mul, shapes, sigmoid, softmax,
)
