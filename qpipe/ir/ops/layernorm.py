"""Integer LayerNorm (I-BERT style): integer mean and variance, an integer square
root by Newton's method, an integer division; the affine ``gamma``/``beta`` is a
per-channel :func:`~qpipe.ir.ops.elementwise.scale_rq` after it.

Over the last axis of ``D`` integers ``x`` (at any scale ``S_x``)::

    c_i = D * x_i - sum(x)                  # D * (x_i - mean), exact
    N   = sum(c_i**2) + eps_int             # D**3 * (var + eps / S_x**2), exact
    r   = isqrt(N << 2j)                    # floor(sqrt(N) * 2**j), Newton
    q_i = round_half_up(c_i * 2**(K+j) / r) # (x_i - mean) / sqrt(var + eps) * 2**K / sqrt(D)

so ``q_i`` at the fixed scale ``sqrt(D) * 2**-K`` is the normalized value
whatever ``S_x`` was: LayerNorm is scale invariant, only ``eps`` sees ``S_x``
(``eps_int = round(eps * D**3 / S_x**2)``). ``|c_i| <= sqrt(N)``, so
``|q_i| <= 2**K`` (+1 for rounding): with ``K = 14`` the result is an int16.
``j`` (``sqrt_shift``) buys the square root extra bits while ``N << 2j`` fits in
int64; the handler picks it from the input's bit width and ``D``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qpipe.ir.opspec import OpKind, ScaleRule, qpipe_op
from qpipe.ir.ops.kernels import bit_length, dtype_for_bits

LN_FRAC_BITS = 14  # K: the normalized value has 2**14 steps per sqrt(D) standard deviations


def isqrt_newton(n: Tensor) -> Tensor:
    """``floor(sqrt(n))`` of each non-negative int64, by Newton's iteration in integers.

    Starts at ``2**ceil(bits/2) >= sqrt(n)``; from above, ``x <- (x + n // x) // 2``
    decreases monotonically to ``floor(sqrt(n))`` and stops when it no longer does.
    """
    if bool((n < 0).any()):
        raise ValueError("isqrt of a negative number")
    x = torch.ones_like(n) << ((bit_length(n) + 1) >> 1)
    for _ in range(64):
        y = (x + torch.div(n, x.clamp_min(1), rounding_mode="floor")) >> 1
        smaller = y < x
        if not bool(smaller.any()):
            break
        x = torch.where(smaller, y, x)
    return torch.where(n == 0, torch.zeros_like(x), x)


def layer_norm_reference(x: Tensor, eps_int: int, frac_bits: int, sqrt_shift: int) -> Tensor:
    """The integer normalization over the last axis (int64 result), as the module docstring says."""
    x = x.to(torch.int64)
    d = x.shape[-1]
    c = d * x - x.sum(dim=-1, keepdim=True)
    n = (c * c).sum(dim=-1, keepdim=True) + int(eps_int)
    r = isqrt_newton(n << (2 * sqrt_shift)).clamp_min(1)
    num = c << (frac_bits + sqrt_shift)
    return torch.div(2 * num + r, 2 * r, rounding_mode="floor")  # floor(num / r + 1/2)


def layer_norm_scale(d: int, frac_bits: int = LN_FRAC_BITS) -> float:
    """The real scale of one step of ``layer_norm_core``'s output: ``sqrt(D) * 2**-K``."""
    return float(d) ** 0.5 * 2.0 ** -int(frac_bits)


@qpipe_op(
    "layer_norm_core",
    kind=OpKind.NONLINEARITY,
    scale_rule=ScaleRule.FIXED,
    inputs=("x",),
    out_bits="bits",
    fixed_scale=lambda v: layer_norm_scale(int(v["x"].meta["val"].shape[-1]), int(v["frac_bits"])),
)
def layer_norm_core(x: Tensor, eps_int: int, frac_bits: int, sqrt_shift: int, bits: int) -> Tensor:
    """Integer LayerNorm without its affine: (x - mean) / sqrt(var + eps) at the fixed scale sqrt(D) * 2**-frac_bits."""
    return layer_norm_reference(x, eps_int, frac_bits, sqrt_shift).to(dtype_for_bits(bits))


@layer_norm_core.register_fake
def _(x, eps_int, frac_bits, sqrt_shift, bits):
    return torch.empty_like(x, dtype=dtype_for_bits(bits))
