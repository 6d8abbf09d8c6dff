"""Integer matmul of two activations (attention's Q K^T and attention x V).

Both operands are integers at per-tensor scales, so the exact accumulator's scale
is ``S_a * S_b`` (the product rule); a ``requant`` to the observed output scale
follows, and ``fuse-requant`` makes the two one ``matmul_rq``, whose one dyadic
pair takes the product scale ``S_a * S_b`` to the output's
(``OpSpec.product_scale``, checked by the verifier).
"""
from __future__ import annotations

import torch
from torch import Tensor

from qpipe.ir.opspec import OpKind, ScaleRule, qpipe_op
from qpipe.ir.ops.kernels import dtype_for_bits, dtype_for_range, exact_float_dtype, requant_reference


def matmul_accumulate(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (torch.matmul broadcasting) exactly, as int64."""
    ft = exact_float_dtype(a, b, a.shape[-1])
    return torch.matmul(a.to(ft), b.to(ft)).to(torch.int64)


@qpipe_op("matmul_acc", kind=OpKind.ACCUMULATE, scale_rule=ScaleRule.PRODUCT, inputs=("a", "b"), out_bits="acc_bits",
          fused="matmul_rq")
def matmul_acc(a: Tensor, b: Tensor, acc_bits: int) -> Tensor:
    """Integer ``a @ b`` of two integer activations; the exact accumulator at S_a * S_b."""
    return matmul_accumulate(a, b).to(dtype_for_bits(acc_bits))


@matmul_acc.register_fake
def _(a, b, acc_bits):
    return torch.matmul(a.to(torch.float32), b.to(torch.float32)).to(dtype_for_bits(acc_bits))


@qpipe_op(
    "matmul_rq",
    kind=OpKind.REQUANTIZE,
    scale_rule=ScaleRule.OBSERVED,
    inputs=("a", "b"),
    multipliers=("m",),
    shift="s",
    clamp=("lo", "hi"),
    out_bits="bits",
    product_scale=lambda scales, values: scales[0] * scales[1],
)
def matmul_rq(a: Tensor, b: Tensor, m: Tensor, s: Tensor, lo: int, hi: int, bits: int) -> Tensor:
    """Integer ``a @ b`` + one dyadic requant (from S_a * S_b to the output scale) + clamp."""
    acc = matmul_accumulate(a, b)
    return requant_reference(acc, m.reshape(()), s.reshape(()), 0, lo, hi).to(dtype_for_range(bits, lo, hi))


@matmul_rq.register_fake
def _(a, b, m, s, lo, hi, bits):
    return torch.matmul(a.to(torch.float32), b.to(torch.float32)).to(dtype_for_range(bits, lo, hi))
