"""CUDA kernels of the torch-int8 program: ``torch._int_mm`` (cuBLASLt int8 GEMM,
int32 out) for pointwise convolutions, linears and (through im2col) other dense
convolutions; Triton kernels for the depthwise convolution (int32 accumulators,
requantization fused) and the per-channel requantization of a GEMM's output.

The products and sums are integers (int32 accumulators, the bias in int64), so no
cuDNN algorithm choice (FFT, Winograd, TF32) can round anything. The requantization
is the reference's: the dyadic one in int64 (two's-complement wrap, arithmetic
shifts, as torch's int64 ops), or the float32-faithful one (the default pipeline's:
one cast to float32, one float32 multiply, ties to even), both inside the Triton
kernels. Without Triton the requantization runs as torch ops and the depthwise
convolution as an unfold + int32 multiply-sum: the same integers, slower.

Activations are int8 [-128, 127] or uint8 [0, 255] (a ReLU's output, ``dtype_for_range``),
as on the CPU: ``torch._int_mm`` takes int8 x int8, so a uint8 input goes in as the
int8 ``x - 128`` and ``128 * sum_k w[c, k]`` joins channel ``c``'s int64 bias (exact);
the depthwise kernel loads either type, and every kernel writes the reference's dtype.

Written without a GPU at hand, then run on one (an H200, torch 2.11, Triton 3.6): bit-exact
with the CPU reference on both demo QuartzNets at batch 1 and 8, eager and replayed from
CUDA graphs (``cuda_graph.py``). The tests run these kernels, Triton's included, on CPU
tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``);
``tools/bench/torch_int8_cuda_check.py`` checks them bit for bit against the CPU
reference and times them where CUDA exists.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import Tensor

from qpipe.backends._torch_int8.f32 import f32_multipliers, requant_f32
from qpipe.ir.ops.kernels import dtype_for_range, requant_reference, round_shift
from qpipe.ir.ops.quantize import quantize_by

I32_EXACT = 1 << 31
U8_SHIFT = 128


def _to_signed(x: Tensor) -> Tensor:
    """uint8 codes as the int8 ``x - 128`` (the top bit flipped)."""
    return torch.bitwise_xor(x, U8_SHIFT).view(torch.int8)


def _shift_correction(w: Tensor) -> Tensor:
    """``128 * sum_k w[c, k]`` per output channel (int64): what ``w @ (x - 128)`` lacks of ``w @ x``."""
    return w.to(torch.int64).reshape(w.shape[0], -1).sum(1) * U8_SHIFT

try:  # Triton is optional; a CPU-only machine has none
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001
    triton = None
    tl = None


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _requant_tile(v, rc, mask_c, m_ptr, s_ptr, mult_ptr, lo, hi, F32: tl.constexpr):
        """int64 accumulators (their bias added) of channels ``rc`` -> the clamped codes, as int64.

        ``F32``: the float32-faithful requant, ``round_half_even(fl32(v) * mult)``: one rounding
        to float32 (the cast), one float32 multiply, then the clamp *before* the rounding, which
        is the same as after it (lo and hi are integers) and keeps ``|p| <= 2**15``, where adding
        and taking off 1.5 * 2**23 rounds to the nearest integer, ties to even. The clamp also
        stands between the multiply and that add, so no compiler can fuse them into an FMA.
        Otherwise the dyadic ``(v * m + 2**(s-1)) >> s`` in int64 (two's-complement wrap)."""
        if F32:
            mult = tl.load(mult_ptr + rc, mask=mask_c, other=0.0)
            p = v.to(tl.float32) * mult[None, :]
            p = tl.minimum(tl.maximum(p, lo.to(tl.float32)), hi.to(tl.float32))
            return ((p + 12582912.0) - 12582912.0).to(tl.int64)
        m = tl.load(m_ptr + rc, mask=mask_c, other=0)
        s = tl.load(s_ptr + rc, mask=mask_c, other=0)
        half = tl.where(s > 0, tl.full(s.shape, 1, tl.int64) << tl.maximum(s - 1, 0), tl.zeros(s.shape, tl.int64))
        r = (v * m[None, :] + half[None, :]) >> s[None, :]
        return tl.minimum(tl.maximum(r, lo), hi)

    @triton.jit
    def _requant_cols_kernel(acc_ptr, out_ptr, bias_ptr, m_ptr, s_ptr, mult_ptr, M, N, lo, hi,
                             HAS_BIAS: tl.constexpr, F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = rm < M
        mask_n = rn < N
        mask = mask_m[:, None] & mask_n[None, :]
        v = tl.load(acc_ptr + rm[:, None] * N + rn[None, :], mask=mask, other=0).to(tl.int64)
        if HAS_BIAS:
            v += tl.load(bias_ptr + rn, mask=mask_n, other=0).to(tl.int64)[None, :]
        r = _requant_tile(v, rn, mask_n, m_ptr, s_ptr, mult_ptr, lo, hi, F32)
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], r.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dw_conv1d_rq_kernel(x_ptr, w_ptr, bias_ptr, m_ptr, s_ptr, mult_ptr, out_ptr, T, C, Tout, K, stride, pad, dil,
                             lo, hi, HAS_BIAS: tl.constexpr, F32: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_C: tl.constexpr):
        # x: (B, T, C) int8 channels-last; w: (K, C) int32; out: (B, Tout, C)
        b = tl.program_id(0)
        pid_t = tl.program_id(1)
        pid_c = tl.program_id(2)
        rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = rc < C
        mask_t = rt < Tout
        acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.int32)
        x_base = x_ptr + b.to(tl.int64) * T * C
        for k in range(0, K):
            tin = rt * stride - pad + k * dil
            ok = (tin >= 0) & (tin < T) & mask_t
            xv = tl.load(x_base + tin[:, None] * C + rc[None, :], mask=ok[:, None] & mask_c[None, :], other=0).to(tl.int32)
            wv = tl.load(w_ptr + k * C + rc, mask=mask_c, other=0)
            acc += xv * wv[None, :]
        v = acc.to(tl.int64)
        if HAS_BIAS:
            v += tl.load(bias_ptr + rc, mask=mask_c, other=0).to(tl.int64)[None, :]
        r = _requant_tile(v, rc, mask_c, m_ptr, s_ptr, mult_ptr, lo, hi, F32)
        o_base = out_ptr + b.to(tl.int64) * Tout * C
        tl.store(o_base + rt[:, None] * C + rc[None, :], r.to(out_ptr.dtype.element_ty),
                 mask=mask_t[:, None] & mask_c[None, :])


    @triton.jit
    def _add_rq_kernel(a_ptr, b_ptr, out_ptr, n, ma, mb, half, s, lo, hi, BLOCK: tl.constexpr):
        # the residual add over the storage of a, b and out (one layout for all three): int64 arithmetic
        r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = r < n
        a = tl.load(a_ptr + r, mask=mask, other=0).to(tl.int64)
        b = tl.load(b_ptr + r, mask=mask, other=0).to(tl.int64)
        v = (a * ma + b * mb + half) >> s
        v = tl.minimum(tl.maximum(v, lo), hi)
        tl.store(out_ptr + r, v.to(out_ptr.dtype.element_ty), mask=mask)


def _per_channel(t: Tensor, c: int, device) -> Tensor:
    return t.to(torch.int64).reshape(-1).expand(c).contiguous().to(device)


class CudaRequant:
    """Per-column requantization of an (N, C) int32/int64 accumulator on the GPU.

    ``corr``: the per-column ``128 * sum_k w`` a GEMM of a shifted uint8 input lacks
    (``__call__(acc, shifted=True)`` adds it with the bias).
    """

    def __init__(self, device, c: int, bias: Optional[Tensor], m: Tensor, s: Tensor, lo: int, hi: int, bits: int,
                 corr: Optional[Tensor] = None, f32: bool = False):
        self.c, self.lo, self.hi, self.bits = c, int(lo), int(hi), int(bits)
        self.mult = f32_multipliers(m, s, c, device) if f32 else None  # f32=True: float32 arithmetic (f32.py)
        self.m, self.s = _per_channel(m, c, device), _per_channel(s, c, device)
        self.bias = _per_channel(bias, c, device) if bias is not None else None
        if corr is None:
            self.bias_shifted = self.bias
        else:
            corr = corr.to(torch.int64).reshape(-1).to(device)
            self.bias_shifted = (corr if self.bias is None else self.bias + corr).contiguous()
        self.dtype = dtype_for_range(self.bits, self.lo, self.hi)
        # the fused Triton kernels: either requant (a dyadic one needs shifts a 64-bit shift can do)
        self.triton = triton is not None and self.bits <= 16 and (f32 or bool(((self.s >= 0) & (self.s <= 63)).all()))

    def launch_args(self) -> tuple:
        """The requant's pointers for a Triton kernel: m, s, and mult (m again where it is dyadic)."""
        return self.m, self.s, self.mult if self.mult is not None else self.m

    def __call__(self, acc: Tensor, shifted: bool = False) -> Tensor:
        bias = self.bias_shifted if shifted else self.bias
        if self.triton and acc.dtype in (torch.int32, torch.int64):
            acc = acc.contiguous()
            M, N = acc.shape
            out = torch.empty((M, N), dtype=self.dtype, device=acc.device)
            grid = (triton.cdiv(M, 64), triton.cdiv(N, 64))
            _requant_cols_kernel[grid](acc, out, bias if bias is not None else self.m, *self.launch_args(), M, N,
                                       self.lo, self.hi, HAS_BIAS=bias is not None, F32=self.mult is not None,
                                       BLOCK_M=64, BLOCK_N=64)
            return out
        if self.mult is not None:
            return requant_f32(acc, bias, self.mult, self.lo, self.hi).to(self.dtype)
        acc = acc.to(torch.int64)
        if bias is not None:
            acc = acc + bias
        return requant_reference(acc, self.m, self.s, 1, self.lo, self.hi).to(self.dtype)


class CudaIntMM:
    """``x (M, K) int8 @ w.T`` -> int32 with cuBLASLt; pads to m > 16 and k, n multiples of 8 (int8 only:
    the caller shifts a uint8 input).

    The weight is kept (N, K) row-major and handed over as its transpose, a column-major (K, N) view:
    int8 tensor cores multiply K-major operands only, and cuBLASLt answers CUBLAS_STATUS_NOT_SUPPORTED
    to a row-major second operand (seen on an H200 with torch 2.11 / CUDA 13)."""

    def __init__(self, w: Tensor, device):
        self.n, self.k = w.shape
        self.kp, self.np = -(-self.k // 8) * 8, -(-self.n // 8) * 8
        wp = torch.zeros(self.np, self.kp, dtype=torch.int8)
        wp[: self.n, : self.k] = w
        self.wt = wp.to(device).t()  # (K, N), column-major

    def __call__(self, x: Tensor) -> Tensor:
        m = x.shape[0]
        mp = max(m, 17)
        if mp != m or self.kp != self.k:
            x = torch.nn.functional.pad(x, (0, self.kp - self.k, 0, mp - m))
        out = torch._int_mm(x.contiguous(), self.wt)
        return out[:m, : self.n]


class CudaConv1d:
    """conv1d_rq on channels-last int8: pointwise and dense/grouped via _int_mm (im2col), depthwise via Triton."""

    def __init__(self, device, a: dict[str, Any], x_bits: int):
        w = a["w"].cpu()
        self.co, cig, self.kk = w.shape
        self.stride, self.pad, self.dil = int(a["stride"][0]), int(a["padding"][0]), int(a["dilation"][0])
        self.groups = int(a["groups"])
        bias = a.get("bias")
        bias = bias.cpu() if bias is not None else None
        # 255 bounds |x| of int8 and uint8 inputs alike (the depthwise kernel takes both unshifted;
        # a GEMM's shifted input is within 128)
        bound = int(w.to(torch.int64).abs().reshape(self.co, -1).sum(1).max()) * 255
        if bound >= I32_EXACT or x_bits > 8:
            raise ValueError("accumulator may exceed int32")
        self.depthwise = self.groups == self.co and cig == 1
        corr = None if self.depthwise else _shift_correction(w)
        self.rq = CudaRequant(device, self.co, bias if not self.depthwise else None, a["m"], a["s"], a["lo"], a["hi"], a["bits"],
                              corr, f32=bool(a.get("f32", False)))
        if self.depthwise:
            self.kind = "triton-depthwise" if triton is not None else "unfold-int32-depthwise"
            self.w_kc = w[:, 0, :].t().contiguous().to(torch.int32).to(device)  # (K, C)
            self.bias = bias.to(torch.int64).to(device) if bias is not None else None
        else:
            self.kind = "int_mm" if self.kk == 1 and self.groups == 1 else "im2col-int_mm"
            g = self.groups
            self.cog = self.co // g
            # per group: (Co/g, Ci/g * K) with the reduction index (k, ci) to match the im2col below
            self.mms = [CudaIntMM(w[i * self.cog:(i + 1) * self.cog].permute(0, 2, 1).reshape(self.cog, -1), device) for i in range(g)]

    def _dw(self, xcl: Tensor) -> Tensor:
        B, T, C = xcl.shape
        tout = (T + 2 * self.pad - self.dil * (self.kk - 1) - 1) // self.stride + 1
        if triton is not None and self.rq.triton:
            out = torch.empty((B, tout, C), dtype=self.rq.dtype, device=xcl.device)
            bt, bc = 32, 64
            grid = (B, triton.cdiv(tout, bt), triton.cdiv(C, bc))
            _dw_conv1d_rq_kernel[grid](xcl, self.w_kc, self.bias if self.bias is not None else self.rq.m, *self.rq.launch_args(),
                                       out, T, C, tout, self.kk, self.stride, self.pad, self.dil, self.rq.lo, self.rq.hi,
                                       HAS_BIAS=self.bias is not None, F32=self.rq.mult is not None, BLOCK_T=bt, BLOCK_C=bc)
            return out
        xp = torch.nn.functional.pad(xcl.transpose(1, 2), (self.pad, self.pad)).to(torch.int32)  # (B, C, Tp)
        u = xp.unfold(2, (self.kk - 1) * self.dil + 1, self.stride)[..., :: self.dil]  # (B, C, Tout, K)
        acc = (u * self.w_kc.t()[None, :, None, :]).sum(-1, dtype=torch.int64)  # (B, C, Tout)
        if self.bias is not None:
            acc = acc + self.bias[None, :, None]
        return self.rq(acc.transpose(1, 2).reshape(B * tout, C)).view(B, tout, C)

    def __call__(self, x: Tensor) -> Tensor:
        xcl = x.transpose(1, 2)
        xcl = xcl if xcl.is_contiguous() else xcl.contiguous()
        B, T, C = xcl.shape
        if self.depthwise:
            return self._dw(xcl).transpose(1, 2)
        shifted = xcl.dtype == torch.uint8
        if shifted and self.pad:  # pad with the code 0 first: the correction covers every tap, padded ones too
            xcl = torch.nn.functional.pad(xcl, (0, 0, self.pad, self.pad))
            pad, T = 0, xcl.shape[1]
        else:
            pad = self.pad
        if shifted:
            xcl = _to_signed(xcl)
        if self.kk == 1 and self.stride == 1 and pad == 0:
            rows, tout = xcl.reshape(B * T, C), T
            cols = [rows[:, i * (C // self.groups):(i + 1) * (C // self.groups)] for i in range(self.groups)]
        else:
            xp = torch.nn.functional.pad(xcl, (0, 0, pad, pad))  # (B, Tp, C)
            u = xp.unfold(1, (self.kk - 1) * self.dil + 1, self.stride)[..., :: self.dil]  # (B, Tout, C, K)
            tout = u.shape[1]
            cg = C // self.groups
            cols = [u[:, :, i * cg:(i + 1) * cg, :].permute(0, 1, 3, 2).reshape(B * tout, self.kk * cg) for i in range(self.groups)]
        acc = torch.cat([mm(c.contiguous()) for mm, c in zip(self.mms, cols)], dim=1) if self.groups > 1 else self.mms[0](cols[0].contiguous())
        return self.rq(acc, shifted).view(B, tout, self.co).transpose(1, 2)


class CudaLinear:
    def __init__(self, device, a: dict[str, Any], x_bits: int):
        w = a["w"].cpu()
        bound = int(w.to(torch.int64).abs().sum(1).max()) * 128  # an int8 input, or a uint8 one shifted
        if bound >= I32_EXACT or x_bits > 8:
            raise ValueError("accumulator may exceed int32")
        self.n = w.shape[0]
        self.mm = CudaIntMM(w, device)
        bias = a.get("bias")
        self.rq = CudaRequant(device, self.n, bias.cpu() if bias is not None else None, a["m"], a["s"], a["lo"], a["hi"], a["bits"],
                              _shift_correction(w), f32=bool(a.get("f32", False)))

    def __call__(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        shifted = rows.dtype == torch.uint8
        return self.rq(self.mm(_to_signed(rows) if shifted else rows), shifted).view(*lead, self.n)


class CudaAddRequant:
    """``clamp((a*ma + b*mb + 2**(s-1)) >> s)``: one Triton kernel over the storage where the multipliers and
    the shift are scalars and both inputs share one dense layout (the convs' (B, T, C) codes viewed as
    (B, C, T)); torch int64 ops otherwise."""

    def __init__(self, a: dict[str, Any]):
        self.ma, self.mb, self.s = (a[k].to(torch.int64) for k in ("ma", "mb", "s"))
        self.lo, self.hi = int(a["lo"]), int(a["hi"])
        self.dtype = dtype_for_range(int(a["bits"]), self.lo, self.hi)
        scalar = all(t.numel() == 1 for t in (self.ma, self.mb, self.s))
        self.triton = triton is not None and scalar and 0 <= int(self.s.reshape(-1)[0]) <= 63
        if self.triton:
            self.args = [int(t.reshape(-1)[0]) for t in (self.ma, self.mb)]
            sh = int(self.s.reshape(-1)[0])
            self.args += [(1 << (sh - 1)) if sh > 0 else 0, sh]
        self.kind = "cuda add-rq (triton)" if self.triton else "cuda add-rq (torch int64)"

    @staticmethod
    def _dense(x: Tensor) -> bool:
        return x.is_contiguous() or (x.dim() == 3 and x.transpose(1, 2).is_contiguous())

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        if self.triton and a.shape == b.shape and a.stride() == b.stride() and self._dense(a):
            out = torch.empty_like(a, dtype=self.dtype)  # the same strides (a dense layout is preserved)
            n = a.numel()
            block = 1024
            _add_rq_kernel[(triton.cdiv(n, block),)](a, b, out, n, *self.args, self.lo, self.hi, BLOCK=block)
            return out
        v = a.to(torch.int64) * self.ma.to(a.device) + b.to(torch.int64) * self.mb.to(a.device)
        return round_shift(v, self.s.to(a.device)).clamp(self.lo, self.hi).to(self.dtype)


class CudaQuantize:
    """The reference's input quantizer with its float32 scale kept on the GPU: the reference makes the scale
    tensor per call, a host-to-device copy that a CUDA graph cannot capture."""

    def __init__(self, device, a: dict[str, Any]):
        self.scale = torch.tensor(float(a["scale"]), dtype=torch.float32, device=device)
        self.bits = int(a["bits"])

    def __call__(self, x: Tensor) -> Tensor:
        return quantize_by(x, self.scale, self.bits)


class CudaBackend:
    def __init__(self, device):
        self.device = torch.device(device)

    def context(self):
        return contextlib.nullcontext()

    def make(self, op: str, a: dict[str, Any], x_bits: int, x_unsigned: bool = False) -> Optional[tuple]:
        try:
            if op == "conv1d_rq":
                k = CudaConv1d(self.device, a, x_bits)
                return k, ["x"], f"cuda {k.kind}"
            if op == "linear_rq":
                return CudaLinear(self.device, a, x_bits), ["x"], "cuda int_mm"
        except ValueError:
            return None  # the reference kernel (on the GPU, op by op)
        if op == "add_requant":
            k = CudaAddRequant(a)
            return k, ["a", "b"], k.kind
        if op == "quantize":
            return CudaQuantize(self.device, a), ["x"], "cuda quantize"
        if op == "clamp_int":
            lo, hi = int(a["lo"]), int(a["hi"])
            return (lambda x: x.clamp(lo, hi)), ["x"], "clamp"
        return None
