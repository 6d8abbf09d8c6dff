"""Residual adds: both integer inputs rescaled to the observed output scale in one
accumulator (one dyadic multiplier each, one shared shift), then clamped."""
from __future__ import annotations

import torch
from torch.fx import Node

from qpipe.ir.dyadic import dyadic_common_shift_bounded
from qpipe.ir.errors import QpipeError
from qpipe.ir.meta import source_name
from qpipe.ir.qtype import QType
from qpipe.passes.lower.context import Lowering
from qpipe.passes.lower.table import OpFamily, register_family

ADD_OPS = frozenset({torch.ops.aten.add.Tensor})


def lower_add(node: Node, lw: Lowering) -> None:
    a, b = node.args[0], node.args[1]
    if node.kwargs.get("alpha", 1) != 1:
        raise QpipeError(f"{source_name(node)}: add with alpha is not supported")
    ai, bi = lw.int_input(node, a), lw.int_input(node, b)
    out_scale, bits, act, facts = lw.out_qparams(node)
    lo, hi = lw.int_bounds(bits, out_scale, act, facts.get("unsigned", False))
    qa, qb = lw.qtype(ai), lw.qtype(bi)
    # |a*ma + b*mb| <= max|a|*ma + max|b|*mb: fits int64 at 16 bits with 31-bit m; narrowed if ever not
    (ma, mb), s = dyadic_common_shift_bounded([qa.scale / out_scale, qb.scale / out_scale],
                                              [qa.max_abs, qb.max_abs])
    before = lw.anchor(node)
    consts = {name: lw.const(f"{node.name}_{name}", torch.tensor(v, dtype=torch.int64), before)
              for name, v in (("ma", ma), ("mb", mb), ("s", s))}
    qp = {"out_scale": out_scale, "bits": bits, "lo": lo, "hi": hi, "ma": ma, "mb": mb, "s": s, **facts}
    values = {"a": ai, "b": bi, **consts, "lo": lo, "hi": hi, "bits": bits}
    out = lw.emit(before, torch.ops.qpipe.add_requant.default, values, node, QType.of(bits, out_scale), qp)
    lw.bind(node, out)
    if act is not None:
        lw.bind(act, out)
        lw.count("activation")
    lw.count("add")


ADD = register_family(OpFamily("add", ADD_OPS, lower_add, observed=True))
