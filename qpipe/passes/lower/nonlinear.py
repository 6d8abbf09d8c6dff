"""What the nonlinear op handlers (softmax, gates, GELU, mean, mul) share.

* ``per_tensor``: the integer input's scale (these kernels need one per tensor).
* ``exp_pair``: the dyadic ``(m, s)`` of an exp stage, narrowed so ``x * m`` fits int64.
* ``requant_consts``: the int64 ``(m, s)`` constants that take a product's real
  scale to the observed output scale, with ``m`` narrowed to ``m_bits``.
* ``emit_requantized``: emit an OBSERVED op whose ``(m, s)`` multiplies a product
  (``OpSpec.product_scale``), at the node's observed scale and clamp (a ReLU read
  only by it folds in), and bind the node (and the folded activation).
* constant operands: ``x * c`` and ``x / c`` (a Python number or a float
  constant) are not products of two activations. Whoever lowers them (folding
  the constant into scales) registers a handler with
  :func:`register_constant_operand`; ``mul``/``div`` call it, and without one
  they fail with one line naming the node.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.fx import Node

from qpipe.ir.dyadic import dyadic
from qpipe.ir.errors import QpipeError
from qpipe.ir.meta import QPOLICY, source_name
from qpipe.ir.ops.iexp import exp_input_ratio, exp_m_bits
from qpipe.ir.opspec import spec_for
from qpipe.ir.policy import QuantSpec
from qpipe.ir.printer import target_name
from qpipe.ir.qtype import QType
from qpipe.passes.lower.context import Lowering


def per_tensor(lw: Lowering, node: Node, xi: Node) -> QType:
    q = lw.qtype(xi)
    if q.per_channel:
        raise QpipeError(f"{source_name(node)}: {target_name(node)} needs a per-tensor input scale, got {q}")
    return q


def exp_pair(q: QType) -> tuple[int, int]:
    return dyadic(exp_input_ratio(float(q.scale)), m_bits=exp_m_bits(q.bits))


def policy_bits(node: Node, default: int) -> int:
    """A fixed-scale op's output bits: its own policy's (a QuantSpec in meta['qpolicy']) or ``default``."""
    spec = node.meta.get(QPOLICY)
    return int(spec.bits) if isinstance(spec, QuantSpec) else default


def requant_consts(lw: Lowering, node: Node, ratio: float, m_bits: int, before: Node,
                   max_shift: Optional[int] = None) -> tuple[Node, Node, int, int]:
    m_bits = max(2, min(31, m_bits))
    m, s = dyadic(ratio, m_bits=m_bits)
    if max_shift is not None and s > max_shift:
        m, s = dyadic(ratio, m_bits=max(2, m_bits - (s - max_shift)))
    mc = lw.const(f"{node.name}_m", torch.tensor(m, dtype=torch.int64), before)
    sc = lw.const(f"{node.name}_s", torch.tensor(s, dtype=torch.int64), before)
    return mc, sc, m, s


def emit_requantized(lw: Lowering, node: Node, op, values: dict[str, Any], in_scales: tuple[float, ...],
                     product_bits: int, extra_qparams: Optional[dict] = None, max_shift: Optional[int] = None) -> Node:
    """Emit ``op`` (an OBSERVED op with a ``product_scale``) at ``node``'s observed output scale; bind it."""
    out_scale, bits, act, facts = lw.out_qparams(node)
    lo, hi = lw.int_bounds(bits, out_scale, act, facts.get("unsigned", False))
    spec = spec_for(op)
    product = spec.product_scale(in_scales, values)
    before = lw.anchor(node)
    mc, sc, m, s = requant_consts(lw, node, product / out_scale, 62 - product_bits - 1, before, max_shift)
    qp = {"out_scale": out_scale, "bits": bits, "lo": lo, "hi": hi, "m": m, "s": s, **(extra_qparams or {}), **facts}
    out = lw.emit(before, op, {**values, "m": mc, "s": sc, "lo": lo, "hi": hi, "bits": bits}, node,
                  QType.of(bits, out_scale), qp)
    lw.bind(node, out)
    if act is not None:
        lw.bind(act, out)
        lw.count("activation")
    return out


_CONSTANT_HANDLERS: dict[Any, Callable[[Node, Lowering], bool]] = {}


def register_constant_operand(aten_op, handler: Callable[[Node, Lowering], bool]) -> None:
    """``handler(node, lw) -> handled`` lowers ``aten_op`` when one operand is a constant (x * c, x / c)."""
    if aten_op in _CONSTANT_HANDLERS:
        raise ValueError(f"{aten_op} already has a constant-operand handler")
    _CONSTANT_HANDLERS[aten_op] = handler


def lower_constant_operand(node: Node, lw: Lowering) -> None:
    handler = _CONSTANT_HANDLERS.get(node.target)
    if handler is None or not handler(node, lw):
        raise QpipeError(
            f"{source_name(node)}: {target_name(node)} of an activation and a constant has no integer kernel yet "
            "(only products of two activations and the squeeze-excite mean are lowered)"
        )
