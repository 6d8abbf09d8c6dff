"""LayerNorm over the last axis: ``qpipe.layer_norm_core`` (integer mean, variance,
Newton square root, division; int16 at the fixed scale sqrt(D) * 2**-14), then
the affine as one per-channel ``qpipe.scale_rq``: ``w = sign(gamma)`` at scale
``|gamma|``, ``beta`` in the bias, requantized to the observed output scale."""
from __future__ import annotations

import math

import torch
from torch.fx import Node

from qpipe.ir.dyadic import dyadic_bounded, int_range
from qpipe.ir.errors import QpipeError
from qpipe.ir.graph_utils import fetch_attr
from qpipe.ir.meta import source_name
from qpipe.ir.ops.layernorm import LN_FRAC_BITS, layer_norm_scale
from qpipe.ir.qtype import QType
from qpipe.passes.lower.context import Lowering
from qpipe.passes.lower.table import OpFamily, register_family

aten = torch.ops.aten
LAYER_NORM_OPS = frozenset({aten.layer_norm.default})
CORE_BITS = 16


def sqrt_shift_for(in_bits: int, d: int, eps_int: int, max_abs: int | None = None) -> int:
    """Extra bits for the square root: ``j`` with ``(D**3 * hi**2 + eps_int) << 2j`` below 2**62
    (``hi``: the input's largest ``|code|``, by default that of the full signed range of ``in_bits``)."""
    hi = (1 << (in_bits - 1)) if max_abs is None else int(max_abs)
    bound = d**3 * hi * hi + eps_int
    return max(0, min(16, (62 - bound.bit_length()) // 2))


def affine_constants(gamma: torch.Tensor, beta: torch.Tensor, core_scale: float, out_scale: float):
    """(w, w scales, bias, m, s) of the per-channel affine after the core, all exact integers but the scales."""
    g = gamma.to(torch.float64)
    w = torch.sign(g).to(torch.int8)
    zero = w == 0
    w_scale = torch.where(zero, torch.full_like(g, out_scale / core_scale), g.abs())
    acc_scale = core_scale * w_scale
    bias = torch.floor(beta.to(torch.float64) / acc_scale + 0.5)
    if float(bias.abs().max()) >= 2**40:
        raise ValueError("LayerNorm beta/gamma ratio too large for an integer bias")
    # |x * w + bias| <= hi(core) + |bias| per channel: m shortened only if that times m could pass int64
    bounds = (int_range(CORE_BITS)[1] + bias.abs()).tolist()
    pairs = [dyadic_bounded(r, int(b)) for r, b in zip((acc_scale / out_scale).tolist(), bounds)]
    m = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    s = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    return w, w_scale, bias.to(torch.int64), m, s


def lower_layer_norm(node: Node, lw: Lowering) -> None:
    x, shape = node.args[0], node.args[1]
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
    eps = float(node.args[4] if len(node.args) > 4 else node.kwargs.get("eps", 1e-5))
    if len(shape) != 1:
        raise QpipeError(f"{source_name(node)}: LayerNorm over {len(shape)} axes is not supported (only the last)")
    d = int(shape[0])
    xi = lw.int_input(node, x)
    xq = lw.qtype(xi)
    eps_int = min(int(math.floor(eps * d**3 / float(xq.scale) ** 2 + 0.5)), 2**60)
    j = sqrt_shift_for(xq.bits, d, eps_int, xq.max_abs)
    before = lw.anchor(node)
    core_scale = layer_norm_scale(d, LN_FRAC_BITS)
    core_q = {"eps_int": eps_int, "frac_bits": LN_FRAC_BITS, "sqrt_shift": j}
    core = lw.emit(before, torch.ops.qpipe.layer_norm_core.default,
                   {"x": xi, **core_q, "bits": CORE_BITS}, node, QType.of(CORE_BITS, core_scale), core_q)
    gamma = fetch_attr(lw.gm, weight.target).detach() if weight is not None else torch.ones(d)
    beta = fetch_attr(lw.gm, bias.target).detach() if bias is not None else torch.zeros(d)
    out_scale, bits, act, facts = lw.out_qparams(node)
    lo, hi = lw.int_bounds(bits, out_scale, act, facts.get("unsigned", False))
    w, w_scale, bq, m, s = affine_constants(gamma, beta, core_scale, out_scale)
    channel_dim = node.meta["val"].dim() - 1
    consts = {
        "w": lw.const(f"{node.name}_gamma_sign", w, before, QType.of(8, w_scale.tolist(), channel_dim)),
        "bias": lw.const(f"{node.name}_beta_q", bq, before, QType.of(64, (core_scale * w_scale).tolist(), channel_dim)),
        "m": lw.const(f"{node.name}_m", m, before),
        "s": lw.const(f"{node.name}_s", s, before),
    }
    qp = {"out_scale": out_scale, "bits": bits, "lo": lo, "hi": hi, **facts}
    values = {"x": core, **consts, "channel_dim": channel_dim, "lo": lo, "hi": hi, "bits": bits}
    out = lw.emit(before, torch.ops.qpipe.scale_rq.default, values, node, QType.of(bits, out_scale), qp)
    lw.bind(node, out)
    if act is not None:
        lw.bind(act, out)
        lw.count("activation")
    lw.count("layer_norm")


LAYER_NORM = register_family(OpFamily("layer_norm", LAYER_NORM_OPS, lower_layer_norm, observed=True))
