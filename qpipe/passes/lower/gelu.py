"""GELU (``aten.gelu``, exact or tanh form) -> ``qpipe.gelu_int`` (I-BERT's i-GELU
on a Q16 grid), requantized to the observed output scale. For models outside
NeMo's ASR set (NeMo's Conformer uses SiLU)."""
from __future__ import annotations

import torch
from torch.fx import Node

from qpipe.ir.dyadic import dyadic
from qpipe.ir.ops.gelu import gelu_input_ratio
from qpipe.passes.lower.context import Lowering
from qpipe.passes.lower.nonlinear import emit_requantized, per_tensor
from qpipe.passes.lower.table import OpFamily, register_family


def lower_gelu(node: Node, lw: Lowering) -> None:
    xi = lw.int_input(node, node.args[0])
    qx = per_tensor(lw, node, xi)
    m_u, s_u = dyadic(gelu_input_ratio(float(qx.scale)), m_bits=max(8, min(31, 61 - qx.bits)))
    emit_requantized(lw, node, torch.ops.qpipe.gelu_int.default, {"x": xi, "m_u": m_u, "s_u": s_u},
                     (float(qx.scale),), qx.bits + 18, {"m_u": m_u, "s_u": s_u})
    lw.count("gelu")


GELU = register_family(OpFamily("gelu", frozenset({torch.ops.aten.gelu.default}), lower_gelu, observed=True))
