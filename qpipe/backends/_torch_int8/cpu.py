"""CPU kernels of the torch-int8 program, each bit-exact with its ``qpipe::`` reference.

Activations stay in the graph's shapes, (B, C, T) / (B, C, H, W), but are *stored*
channels-last: every kernel here returns the channels-first view of a
channels-last tensor, so a chain of convolutions never transposes and the graph's
own layout ops (the head's ``transpose``) run unchanged on the views.

Why each kernel is exact:

* pointwise convolutions and linears: oneDNN's int8 matmul (``onednn.qlinear_pointwise``,
  AMX/VNNI brgemm; int32 accumulation, fp32 output with unit scales) is exact when
  every accumulator is below 2**24 in magnitude (``bound``, proven per layer from the
  weights and the input's bit width); ``torch._int_mm`` (int32 out) when below 2**31;
  float64 otherwise.
* every other convolution (depthwise above all): fp32 ``conv2d`` on channels-last
  input, which runs oneDNN's direct kernels; with ``bound < 2**24`` every product
  and partial sum is an exact fp32 integer in any summation order. fp32 precision is
  forced to IEEE for the call (``mkldnn.conv.fp32_precision``), so a user's bf16/tf32
  setting cannot round it.
* requantization: ``requant_cols`` in C++ (int64 multiply, round half up, arithmetic
  shift, two's-complement wrap as torch's int64), or ``requant_reference`` itself.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Optional

import torch
from torch import Tensor

from qpipe.ir.ops.kernels import dtype_for_bits, requant_reference, round_shift

F32_EXACT = 1 << 24
I32_EXACT = 1 << 31


# --------------------------------------------------------------------------- capabilities


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=None)
def qlinear_ok() -> bool:
    """oneDNN's int8 matmul, where the CPU has integer dot-product instructions and a probe is exact.

    Without VNNI, oneDNN's s8 kernels multiply through saturating 16-bit sums; the
    probe uses the extreme codes that would expose that.
    """
    if not hasattr(torch.ops.onednn, "qlinear_pointwise") or not torch.backends.mkldnn.is_available():
        return False
    if not ({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags()):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        k, n = 256, 64
        x = torch.randint(-128, 128, (64, k), generator=g, dtype=torch.int8)
        x[:8] = 127
        x[8:16] = -128
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        w[:8] = 127
        w[8:16] = -127
        got = QLinear(w)(x)
        return bool(torch.equal(got.double(), x.double() @ w.double().t()))
    except Exception:  # noqa: BLE001  (any failure: use another GEMM)
        return False


@contextlib.contextmanager
def ieee_fp32():
    """fp32 convolutions in IEEE single precision for the duration (no bf16/tf32 shortcuts)."""
    conv = torch.backends.mkldnn.conv
    old = getattr(conv, "fp32_precision", None)
    if old in (None, "none", "ieee"):
        yield
        return
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = old


# --------------------------------------------------------------------------- GEMMs


class QLinear:
    """``x (M, K) int8 @ w.T`` with w (N, K) int8 -> fp32 (M, N) of exact integers (bound < 2**24)."""

    def __init__(self, w: Tensor):
        self.n, self.k = w.shape
        self.packed = torch.ops.onednn.qlinear_prepack(w.contiguous(), None)
        self.ones = torch.ones(self.n)
        self.zp = torch.zeros(self.n, dtype=torch.long)

    def __call__(self, x: Tensor) -> Tensor:
        return torch.ops.onednn.qlinear_pointwise(
            x, 1.0, 0, self.packed, self.ones, self.zp, None, 1.0, 0, torch.float32, "none", [], ""
        )


class IntMM:
    """``torch._int_mm`` (int32 out, exact below 2**31): m > 16 and k, n multiples of 8, padded here."""

    def __init__(self, w: Tensor):
        self.n, self.k = w.shape
        kp, np_ = -(-self.k // 8) * 8, -(-self.n // 8) * 8
        wt = torch.zeros(kp, np_, dtype=torch.int8)
        wt[: self.k, : self.n] = w.t()
        self.wt, self.kp, self.np = wt, kp, np_

    def __call__(self, x: Tensor) -> Tensor:
        m = x.shape[0]
        mp = max(m, 17)
        if mp != m or self.kp != self.k:
            xp = x.new_zeros(mp, self.kp)
            xp[:m, : self.k] = x
            x = xp
        out = torch._int_mm(x, self.wt)
        return out[:m, : self.n] if (mp != m or self.np != self.n) else out


class F64MM:
    """float64 matmul: exact below 2**53 (the reference's own fallback)."""

    def __init__(self, w: Tensor):
        self.wt = w.to(torch.float64).t().contiguous()

    def __call__(self, x: Tensor) -> Tensor:
        return (x.to(torch.float64) @ self.wt).to(torch.int64)


def make_gemm(w: Tensor, bound: int):
    if bound < F32_EXACT and qlinear_ok():
        return QLinear(w), "onednn-qlinear"
    if bound < I32_EXACT:
        return IntMM(w), "int_mm"
    return F64MM(w), "f64-matmul"


# --------------------------------------------------------------------------- requantization


class Requant:
    """Per-column ``clamp(((acc + bias) * m + 2**(s-1)) >> s, lo, hi)`` of an (N, C) accumulator."""

    def __init__(self, ext: Any, channels: int, bias: Optional[Tensor], m: Tensor, s: Tensor, lo: int, hi: int, bits: int):
        self.c = channels
        self.m = m.to(torch.int64).reshape(-1).expand(channels).contiguous()
        self.s = s.to(torch.int64).reshape(-1).expand(channels).contiguous()
        self.half = torch.where(self.s > 0, torch.ones_like(self.s) << (self.s - 1).clamp_min(0), torch.zeros_like(self.s))
        self.bias = bias.to(torch.int64).reshape(-1).contiguous() if bias is not None else torch.empty(0, dtype=torch.int64)
        self.lo, self.hi, self.bits = int(lo), int(hi), int(bits)
        self.ext = ext if (ext is not None and bool(((self.s >= 0) & (self.s <= 63)).all())) else None
        self.dtype = dtype_for_bits(self.bits)
        self.emit_f32 = False  # set by the program when every consumer convolves in exact fp32

    def __call__(self, acc: Tensor) -> Tensor:
        if self.ext is not None and acc.dtype in (torch.float32, torch.int32) and self.bits <= 16:
            bits = 0 if self.emit_f32 else self.bits
            return self.ext.requant_cols(acc.contiguous(), self.bias, self.m, self.half, self.s, self.lo, self.hi, bits)
        acc = acc.to(torch.int64)
        if self.bias.numel():
            acc = acc + self.bias
        return requant_reference(acc, self.m, self.s, acc.dim() - 1, self.lo, self.hi).to(self.dtype)


class Widen:
    """An accumulator op's output: ``(acc + bias)`` cast to its ``acc_bits`` dtype (as the reference casts)."""

    def __init__(self, bias: Optional[Tensor], bits: int):
        self.bias = bias.to(torch.int64).reshape(-1) if bias is not None else None
        self.dtype = dtype_for_bits(int(bits))

    def __call__(self, acc: Tensor) -> Tensor:
        acc = acc.to(torch.int64)
        if self.bias is not None:
            acc = acc + self.bias
        return acc.to(self.dtype)


# --------------------------------------------------------------------------- layers


def weight_bound(w: Tensor, x_bits: int) -> int:
    """max over output channels of sum |w| times max|x|: no accumulator can exceed it."""
    per = w.to(torch.int64).abs().reshape(w.shape[0], -1).sum(1)
    return int(per.max()) * (1 << (x_bits - 1)) if per.numel() else 0


class Conv:
    """conv1d/conv2d ``_rq`` (requantized) or ``_acc`` (accumulator) on channels-last storage."""

    def __init__(self, ext: Any, a: dict[str, Any], x_bits: int, fused: bool):
        w = a["w"]
        self.dims = w.dim() - 2
        self.co = w.shape[0]
        self.stride, self.padding = list(a["stride"]), list(a["padding"])
        self.dilation, self.groups = list(a["dilation"]), int(a["groups"])
        bias = a.get("bias")
        self.bound = weight_bound(w, x_bits)
        pointwise = (
            self.dims == 1 and w.shape[2] == 1 and self.groups == 1 and self.stride == [1] and self.padding == [0]
            and x_bits <= 8
        )
        if pointwise:
            self.gemm, self.kind = make_gemm(w[:, :, 0], self.bound)
        elif self.bound < F32_EXACT:
            self.kind = "f32-conv-cl"
            w4 = w.to(torch.float32)
            if self.dims == 1:
                w4 = w4.unsqueeze(2)
            self.w4 = w4.contiguous(memory_format=torch.channels_last)
            self.st = [1, *self.stride] if self.dims == 1 else self.stride
            self.pd = [0, *self.padding] if self.dims == 1 else self.padding
            self.dl = [1, *self.dilation] if self.dims == 1 else self.dilation
        else:
            self.kind = "f64-conv"
            self.w64 = w.to(torch.float64)
        if fused:
            self.post = Requant(ext, self.co, bias, a["m"], a["s"], a["lo"], a["hi"], a["bits"])
        else:
            self.post = Widen(bias, a["acc_bits"])
        # exact fp32 integers may travel between layers (no int8 -> fp32 copy before a convolution)
        self.takes_f32 = self.kind == "f32-conv-cl" and self.dims == 1
        self.can_emit_f32 = fused and self.dims == 1 and isinstance(self.post, Requant) and self.post.ext is not None

    @property
    def emit_f32(self) -> bool:
        return getattr(self.post, "emit_f32", False)

    @emit_f32.setter
    def emit_f32(self, on: bool) -> None:
        self.post.emit_f32 = bool(on) and self.can_emit_f32

    def __call__(self, x: Tensor) -> Tensor:
        if self.kind == "f64-conv":
            fn = torch.nn.functional.conv1d if self.dims == 1 else torch.nn.functional.conv2d
            acc = fn(x.to(torch.float64), self.w64, None, self.stride, self.padding, self.dilation, self.groups)
            nd = acc.dim()
            perm = [0, *range(2, nd), 1]
            out = self.post(acc.permute(*perm).reshape(-1, self.co).to(torch.int64))
            return out.view(acc.shape[0], *acc.shape[2:], self.co).permute(0, nd - 1, *range(1, nd - 1))
        if self.dims == 1:
            b, c, t = x.shape
            if self.kind != "f32-conv-cl":
                xt = x.transpose(1, 2)
                xt = xt if xt.is_contiguous() else xt.contiguous()
                out = self.post(self.gemm(xt.reshape(b * t, c)))
                return out.view(b, t, self.co).transpose(1, 2)
            xf = x.transpose(1, 2)
            if xf.dtype != torch.float32 or not xf.is_contiguous():
                xf = torch.empty((b, t, c), dtype=torch.float32).copy_(xf)
            x4 = xf.view(b, 1, t, c).permute(0, 3, 1, 2)
        else:
            x4 = x.to(torch.float32).contiguous(memory_format=torch.channels_last)
        acc = torch.nn.functional.conv2d(x4, self.w4, None, self.st, self.pd, self.dl, self.groups)  # under ieee_fp32()
        acc = acc.contiguous(memory_format=torch.channels_last)
        n, co, h, wd = acc.shape
        out = self.post(acc.permute(0, 2, 3, 1).reshape(n * h * wd, co))
        out = out.view(n, h, wd, co).permute(0, 3, 1, 2)
        return out[:, :, 0, :] if self.dims == 1 else out


class Linear:
    """linear ``_rq`` / ``_acc`` over the last dimension."""

    def __init__(self, ext: Any, a: dict[str, Any], x_bits: int, fused: bool):
        w = a["w"]
        self.n = w.shape[0]
        self.gemm, self.kind = make_gemm(w, weight_bound(w, x_bits)) if x_bits <= 8 else (F64MM(w), "f64-matmul")
        bias = a.get("bias")
        self.post = Requant(ext, self.n, bias, a["m"], a["s"], a["lo"], a["hi"], a["bits"]) if fused else Widen(bias, a["acc_bits"])

    def __call__(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        out = self.post(self.gemm(x.reshape(-1, x.shape[-1]).contiguous()))
        return out.view(*lead, self.n)


class Quantize:
    """The input quantizer in C++ (qpipe's float64 steps), written channels-last; the reference decides ties."""

    def __init__(self, ext: Any, a: dict[str, Any]):
        self.scale, self.bits = float(a["scale"]), int(a["bits"])
        self.ext = ext if self.bits <= 8 and self.scale > 0 else None
        self.can_emit_f32 = self.ext is not None
        self.emit_f32 = False

    def __call__(self, x: Tensor) -> Tensor:
        if self.ext is None or x.dim() != 3 or x.dtype != torch.float32:
            return torch.ops.qpipe.quantize(x, self.scale, self.bits)
        q, undecided = self.ext.quantize_cl(x, self.scale, (1 << (self.bits - 1)) - 1, self.emit_f32)
        if undecided:  # a quotient exactly on a half (or NaN/inf): the reference's exact tie-break
            ref = torch.ops.qpipe.quantize(x, self.scale, self.bits).transpose(1, 2)
            q = ref.to(torch.float32 if self.emit_f32 else ref.dtype).contiguous()
        return q.transpose(1, 2)


class AddRequant:
    """``clamp((a*ma + b*mb + 2**(s-1)) >> s)``: C++ on two tensors of one layout, else the reference."""

    def __init__(self, ext: Any, a: dict[str, Any]):
        self.ma, self.mb, self.s = a["ma"], a["mb"], a["s"]
        self.lo, self.hi, self.bits = int(a["lo"]), int(a["hi"]), int(a["bits"])
        scalar = all(t.numel() == 1 for t in (self.ma, self.mb, self.s))
        self.ext = ext if scalar and 0 <= int(self.s.reshape(-1)[0]) <= 63 and self.bits <= 16 else None
        if self.ext is not None:
            self.args = (int(self.ma.reshape(-1)[0]), int(self.mb.reshape(-1)[0]), int(self.s.reshape(-1)[0]))

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        if self.ext is not None and a.dtype == torch.int8 and b.dtype == torch.int8 and a.shape == b.shape:
            if a.dim() == 3 and a.transpose(1, 2).is_contiguous() and b.transpose(1, 2).is_contiguous():
                return self.ext.add_rq(a.transpose(1, 2), b.transpose(1, 2), *self.args, self.lo, self.hi, self.bits).transpose(1, 2)
            if a.is_contiguous() and b.is_contiguous():
                return self.ext.add_rq(a, b, *self.args, self.lo, self.hi, self.bits)
        v = a.to(torch.int64) * self.ma.to(torch.int64) + b.to(torch.int64) * self.mb.to(torch.int64)
        return round_shift(v, self.s).clamp(self.lo, self.hi).to(dtype_for_bits(self.bits))
