"""Convolutions: weights int8 per output channel, bias int32 at S_x*S_w, an exact
integer accumulator, then a dyadic requantization to the observed output scale."""
from __future__ import annotations

import torch
from torch.fx import Node

from qpipe.ir.dyadic import int_range
from qpipe.ir.graph_utils import fetch_attr
from qpipe.ir.meta import QPOLICY
from qpipe.ir.qtype import QType
from qpipe.passes.lower.context import Lowering
from qpipe.passes.lower.table import OpFamily, register_family

aten = torch.ops.aten
q = torch.ops.qpipe

# the integer accumulator of each float convolution
_ACC_OP = {aten.conv1d.default: q.conv1d_acc.default, aten.conv2d.default: q.conv2d_acc.default}
CONV_OPS = frozenset(_ACC_OP)


def conv_args(node: Node) -> tuple:
    """``aten.convNd(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1)`` with defaults filled."""
    spatial = node.meta["val"].dim() - 2 if "val" in node.meta else 1
    defaults = (None, None, None, [1] * spatial, [0] * spatial, [1] * spatial, 1)
    args = list(node.args) + list(defaults[len(node.args):])
    for i, key in enumerate(("input", "weight", "bias", "stride", "padding", "dilation", "groups")):
        if key in node.kwargs:
            args[i] = node.kwargs[key]
    x, w, b, stride, padding, dilation, groups = args
    if isinstance(padding, str):
        raise ValueError(f"convolution with padding='{padding}' is not supported; export with explicit padding")
    return x, w, b, list(stride), list(padding), list(dilation), int(groups)


def quantize_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel weights: (int tensor, float64 scale per channel)."""
    _, hi = int_range(bits)
    w64 = w.detach().to(torch.float64)
    amax = w64.abs().reshape(w64.shape[0], -1).amax(dim=1)
    scale = torch.where(amax > 0, amax / hi, torch.ones_like(amax))
    wq = torch.floor(w64 / scale.reshape(-1, *([1] * (w64.dim() - 1))) + 0.5).clamp(-hi, hi)
    return wq.to(torch.int8 if bits <= 8 else torch.int16), scale


def lower_weighted(lw: Lowering, node: Node, x: Node, w_node: Node, b_node, acc_op, extra: dict, channel_dim: int) -> None:
    """Shared by convolutions and linears: quantize weight and bias, accumulate, requantize."""
    xi = lw.int_input(node, x)
    x_q = lw.qtype(xi)
    s_x = float(x_q.scale)
    w_bits = node.meta[QPOLICY].weight.bits
    w = fetch_attr(lw.gm, w_node.target)
    wq, s_w = quantize_weight(w, w_bits)
    before = lw.anchor(node)
    wq_node = lw.const(f"{node.name}_wq", wq, before, QType.of(w_bits, s_w.tolist(), 0))
    acc_scales = s_x * s_w
    bias_q = None
    bias_bound = 0
    if b_node is not None:
        b = fetch_attr(lw.gm, b_node.target).detach().to(torch.float64)
        bq = torch.floor(b / acc_scales + 0.5)
        bias_bound = int(bq.abs().max()) if bq.numel() else 0
        bias_dtype = torch.int32 if bias_bound < 2**31 else torch.int64
        bias_q = lw.const(f"{node.name}_bq", bq.to(bias_dtype), before, QType.of(32 if bias_bound < 2**31 else 64, acc_scales.tolist(), 0))
    reduction = int(w[0].numel())
    bound = x_q.max_abs * int_range(w_bits)[1] * reduction + bias_bound
    acc_bits = 32 if bound < 2**31 else 64
    acc_q = {"in_scale": s_x, "w_scale": s_w.to(torch.float32), "acc_bound": bound, "acc_bits": acc_bits}
    values = {"x": xi, "w": wq_node, "bias": bias_q, "acc_bits": acc_bits, **extra}
    acc = lw.emit(before, acc_op, values, node, QType.of(acc_bits, acc_scales.tolist(), channel_dim), acc_q)
    # per output channel, |acc| <= max|x| * sum|w_c| + |b_c|: the requant's m is shortened only where
    # that times m could pass int64 (16-bit weights and activations), so 8-bit pairs never change
    x_hi = x_q.max_abs
    row = wq.to(torch.int64).abs().reshape(wq.shape[0], -1).sum(dim=1) * x_hi
    if b_node is not None:
        row = row + bq.abs().to(torch.int64)
    lw.requant_after(node, acc, before, channel_dim, bounds=row.tolist(), factors=(s_x, s_w.tolist()))


def lower_conv(node: Node, lw: Lowering) -> None:
    x, w_node, b_node, stride, padding, dilation, groups = conv_args(node)
    extra = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    lower_weighted(lw, node, x, w_node, b_node, _ACC_OP[node.target], extra, channel_dim=1)
    lw.count("conv")


CONV = register_family(OpFamily("conv", CONV_OPS, lower_conv, observed=True, weight="weight"))
