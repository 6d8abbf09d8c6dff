"""CPU kernels of the torch-int8 program, each bit-exact with its ``qpipe::`` reference.

Activations stay in the graph's shapes, (B, C, T) / (B, C, H, W), but are *stored*
channels-last: every kernel here returns the channels-first view of a
channels-last tensor, so a chain of convolutions never transposes and the graph's
own layout ops (the head's ``transpose``) run unchanged on the views.

Activations are int8 codes [-128, 127] or, where the reference clamps an output to
``lo >= 0, hi > 127`` (a ReLU's), uint8 codes [0, 255] (``dtype_for_range``); every
kernel here takes either and writes the dtype the reference writes.

Why each kernel is exact:

* pointwise convolutions and linears, where the C++ kernels have AVX-512 VNNI: ``pw_gemm_vnni``
  (u8 x s8 on the codes, int32, exact below 2**31; an int8 input read as ``x + 128`` with
  ``-128 * sum_k w`` in the bias; the float32-faithful requant fused in). Elsewhere: oneDNN's
  int8 matmul (``onednn.qlinear_pointwise``, AMX/VNNI brgemm; int32 accumulation, fp32 output with unit scales) is exact when
  every accumulator is below 2**24 in magnitude (``bound``, proven per layer from the
  weights and the input's bit width); ``torch._int_mm`` (int32 out) when below 2**31;
  float64 otherwise. A uint8 input goes to oneDNN as it is (u8 x s8, its native VNNI
  form) where ``255 * sum_k |w[c, k]| < 2**24``; otherwise (and for ``torch._int_mm``,
  int8 x int8 only) it goes in as the int8 ``x - 128`` (one XOR with 0x80) and
  ``128 * sum_k w[c, k]`` is added to channel ``c``'s int64 bias, an exact integer
  identity, which bounds the accumulators by ``128 * sum_k |w[c, k]|`` as for int8.
* depthwise conv1d, where the C++ kernels have AVX-512 VNNI: ``dw_conv1d_vnni`` multiplies
  the 8-bit codes themselves (u8 x s8 into int32, exact below 2**31; an int8 input read as
  ``x + 128``, ``128 * sum_k w`` taken off with the bias) and requantizes in the kernel when the
  layer's requant is float32-faithful (2.2-3.5x oneDNN's fp32 conv + requant on QuartzNet's
  layers at batch 1 and 8; oneDNN's fp32 depthwise was the program's largest cost).
* every other convolution: fp32 ``conv2d`` on channels-last
  input, which runs oneDNN's direct kernels; with ``bound < 2**24`` every product
  and partial sum is an exact fp32 integer in any summation order (``max|x|`` is 128
  for int8, 255 for uint8). fp32 precision is
  forced to IEEE for the call (``mkldnn.conv.fp32_precision``), so a user's bf16/tf32
  setting cannot round it.
* requantization: ``requant_cols`` in C++ (int64 multiply, round half up, arithmetic
  shift, two's-complement wrap as torch's int64), or ``requant_reference`` itself.
"""
from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Optional

import torch
from torch import Tensor

from qpipe.backends._torch_int8.f32 import f32_multipliers, requant_f32
from qpipe.ir.ops.kernels import dtype_for_bits, dtype_for_range, requant_reference, round_shift

F32_EXACT = 1 << 24
I32_EXACT = 1 << 31
U8_SHIFT = 128  # uint8 x -> int8 x - 128 for the int8 x int8 GEMMs


def out_code(dtype: torch.dtype) -> int:
    """The C++ kernels' output selector: 0 float32 (exact integers), 8 int8, -8 uint8, 16 int16."""
    return {torch.float32: 0, torch.int8: 8, torch.uint8: -8, torch.int16: 16}[dtype]


def to_signed(x: Tensor) -> Tensor:
    """uint8 codes ``x`` as the int8 ``x - 128`` (flip the top bit; same bytes otherwise)."""
    return torch.bitwise_xor(x, U8_SHIFT).view(torch.int8)


def shift_correction(w2: Tensor) -> Tensor:
    """``128 * sum_k w[c, k]`` (int64, per output channel c): what ``w @ (x - 128)`` lacks of ``w @ x``."""
    return w2.to(torch.int64).reshape(w2.shape[0], -1).sum(1) * U8_SHIFT


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


@functools.lru_cache(maxsize=None)
def qlinear_u8_ok() -> bool:
    """oneDNN's int8 matmul on uint8 activations (u8 x s8, zero point 0), exact on a probe of extreme codes."""
    if not qlinear_ok():
        return False
    try:
        g = torch.Generator().manual_seed(1)
        k, n = 256, 64
        x = torch.randint(0, 256, (64, k), generator=g, dtype=torch.uint8)
        x[:8] = 255
        x[8:16] = 0
        x[16:24, ::2] = 255
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        w[:8] = 127
        w[8:16] = -127
        got = QLinear(w)(x)
        return got.dtype == torch.float32 and bool(torch.equal(got.double(), x.double() @ w.double().t()))
    except Exception:  # noqa: BLE001  (any failure: shift to int8 instead)
        return False


def _best_time(fn) -> float:
    """The fastest of 3 timed calls after one untimed one (the kernel-choice probes)."""
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


@functools.lru_cache(maxsize=None)
def qlinear_s8_fast() -> bool:
    """Whether oneDNN runs int8 (s8 x s8) activations with a real kernel on this CPU.

    Measured on an AMD EPYC (Zen 4, AVX-512 VNNI): oneDNN dispatches s8 x s8 matmuls
    against its u8-packed weights to ``ref_int8:any``, 5-8x slower than the u8 x s8 brgemm
    (the demo QuartzNet ran 2.7 s a call instead of a few ms); on an Intel Xeon both are
    brgemm. A timing probe, since oneDNN does not say which kernel it picked."""
    if not qlinear_ok():
        return False
    try:
        g = torch.Generator().manual_seed(2)
        w = torch.randint(-127, 128, (256, 256), generator=g, dtype=torch.int8)
        xs = torch.randint(-128, 128, (512, 256), generator=g, dtype=torch.int8)
        xu = torch.randint(0, 256, (512, 256), generator=g, dtype=torch.uint8)
        q = QLinear(w)
        return _best_time(lambda: q(xs)) < 2.5 * _best_time(lambda: q(xu))
    except Exception:  # noqa: BLE001
        return False


@contextlib.contextmanager
def ieee_fp32():
    """fp32 convolutions and matmuls in IEEE single precision for the duration (no bf16/tf32 shortcuts)."""
    mk = torch.backends.mkldnn
    knobs = [k for k in (getattr(mk, "conv", None), getattr(mk, "matmul", None))
             if getattr(k, "fp32_precision", None) not in (None, "none", "ieee")]
    old = [k.fp32_precision for k in knobs]
    for k in knobs:
        k.fp32_precision = "ieee"
    try:
        yield
    finally:
        for k, o in zip(knobs, old):
            k.fp32_precision = o


# --------------------------------------------------------------------------- GEMMs


class QLinear:
    """``x (M, K) int8 @ w.T`` with w (N, K) int8 -> fp32 (M, N) of exact integers (bound < 2**24)."""

    int8_only = True
    takes_u8 = False

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

    int8_only = True
    takes_u8 = False

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


class F32MM:
    """fp32 matmul of the 8-bit codes as they are (uint8 too): exact while 255 * sum|w| < 2**24.

    What a CPU without integer dot products runs fastest: there ``torch._int_mm`` has no
    real kernel (AMD EPYC Zen 3, AVX2: 7 ms for one 384x384 pointwise layer at 1601 frames,
    about 30x this)."""

    int8_only = False
    takes_u8 = True

    def __init__(self, w: Tensor):
        self.wt = w.to(torch.float32).t().contiguous()

    def __call__(self, x: Tensor) -> Tensor:
        return x.to(torch.float32) @ self.wt


@functools.lru_cache(maxsize=None)
def int_mm_fast() -> bool:
    """Whether ``torch._int_mm`` beats an fp32 matmul here (it does with VNNI / AMX; without, it is a
    plain loop). A timing probe: torch does not say which kernel it has."""
    try:
        g = torch.Generator().manual_seed(3)
        x = torch.randint(-128, 128, (512, 256), generator=g, dtype=torch.int8)
        w = torch.randint(-127, 128, (256, 256), generator=g, dtype=torch.int8)
        xf, wf = x.float(), w.float()
        return _best_time(lambda: torch._int_mm(x, w)) < 1.5 * _best_time(lambda: xf @ wf)
    except Exception:  # noqa: BLE001
        return False


class F64MM:
    """float64 matmul: exact below 2**53 (the reference's own fallback); any integer input."""

    int8_only = False
    takes_u8 = True

    def __init__(self, w: Tensor):
        self.wt = w.to(torch.float64).t().contiguous()

    def __call__(self, x: Tensor) -> Tensor:
        return (x.to(torch.float64) @ self.wt).to(torch.int64)


def make_gemm(w: Tensor, bound: int, x_unsigned: bool = False):
    """The fastest exact GEMM for accumulators below ``bound`` (of an int8 input, or a uint8 one shifted).

    ``gemm.takes_u8``: it may also take uint8 codes as they are (oneDNN's native u8 x s8),
    proven exact for this weight (``sum|w| * 255 < 2**24``); else a uint8 input is shifted.
    Where oneDNN has no fast s8 x s8 kernel (:func:`qlinear_s8_fast`), only a uint8 input that
    goes in as it is takes oneDNN; an int8 (or shifted) one takes ``torch._int_mm`` where that is
    fast (:func:`int_mm_fast`), else an exact fp32 or float64 matmul.
    """
    if bound < F32_EXACT and qlinear_ok():
        takes_u8 = weight_bound(w, 8, True) < F32_EXACT and qlinear_u8_ok()
        if (x_unsigned and takes_u8) or qlinear_s8_fast():  # decided before oneDNN prepacks the weight
            g = QLinear(w)
            g.takes_u8 = takes_u8
            return g, "onednn-qlinear"
    if bound < I32_EXACT and int_mm_fast():
        return IntMM(w), "int_mm"
    if weight_bound(w, 8, True) < F32_EXACT:  # uint8 codes as they are, no shift
        return F32MM(w), "f32-matmul"
    return F64MM(w), "f64-matmul"


def vnni_ok(ext: Any) -> bool:
    """The C++ kernels were built with AVX-512 VNNI (``dw_conv1d_vnni``, ``pw_gemm_vnni``)."""
    return ext is not None and hasattr(ext, "pw_gemm_vnni") and bool(ext.dw_vnni_available())


def vnni_bias(bias: Tensor, acc_bound: Tensor) -> Tensor:
    """The bias a fused VNNI kernel takes: int32 where every ``acc + bias`` provably fits int32
    (``acc_bound + |bias| < 2**31`` on every channel; the kernel then adds in int32 and rounds the sum to
    float32 once, two instructions), else the int64 one (summed in double, then rounded): the same fl32."""
    if bias.numel() and bool(((acc_bound + bias.abs()) < I32_EXACT).all()):
        return bias.to(torch.int32)
    return bias


def kernel_requant(post: Any) -> bool:
    """Whether the VNNI kernels run ``post`` in their own epilogue: a float32-faithful requant with C++, a
    bias below 2**52 and an integer (not fp32) output."""
    return isinstance(post, Requant) and post.mult is not None and post.ext is not None and post.small_bias \
        and not post.emit_f32


def vnni_biases(post: "Requant", acc_bound: Tensor) -> tuple[Tensor, Tensor]:
    """(bias for int8 codes, read as x + 128; bias for uint8 codes), each as :func:`vnni_bias` gives it."""
    return vnni_bias(post.bias_shifted, acc_bound), vnni_bias(post.bias, acc_bound)


def padded_weight(w: Tensor, n_block: int, k_block: int, dtype: torch.dtype) -> Tensor:
    """An (N, K) weight as ``dtype``, zero-padded to whole blocks of its rows and columns (what a packed
    GEMM kernel's loads may read past N and K)."""
    n, k = w.shape
    wp = torch.zeros(-(-n // n_block) * n_block, -(-k // k_block) * k_block, dtype=dtype)
    wp[:n, :k] = w
    return wp


class VnniGemm:
    """``pw_gemm_vnni``: u8 x s8 on the codes themselves (an int8 input read as ``x + 128``), int32,
    exact below 2**31; :meth:`run` fuses a float32-faithful requant into the kernel.

    What it saves against ``torch._int_mm`` + the C++ requant pass: the int32 (M, N) round trip
    through memory, the uint8 -> int8 XOR pass and the padding to multiples of 8."""

    int8_only = False
    takes_u8 = True

    def __init__(self, ext: Any, w: Tensor):
        self.ext, self.n = ext, int(w.shape[0])
        wp = padded_weight(w, 64, 4, torch.int8)
        nnb, kq = wp.shape[0] // 64, wp.shape[1] // 4
        self.wp = wp.view(nnb, 4, 16, kq, 4).permute(0, 3, 1, 2, 4).contiguous()  # (nnb, kq, 4 v, 16 n, 4 k)
        self.w64t = w.to(torch.float64).t().contiguous()
        self.acc_bound = channel_bounds(w, 8, unsigned=True)  # the kernel's u8 codes: every accumulator is below it
        self._biases: Optional[tuple[Tensor, Tensor]] = None

    def biases(self, post: "Requant") -> tuple[Tensor, Tensor]:
        """:func:`vnni_biases` of ``post``, made once (a GEMM has one requant)."""
        if self._biases is None:
            self._biases = vnni_biases(post, self.acc_bound)
        return self._biases

    def __call__(self, x: Tensor) -> Tensor:
        """Any other integer input (never in a planned program): float64, exact below 2**53."""
        return (x.to(torch.float64) @ self.w64t).to(torch.int64)

    def run(self, rows: Tensor, post: Any) -> Tensor:
        """``post`` of ``rows @ w.T`` (rows: int8 / uint8 (M, K) contiguous); the correction of a
        shifted int8 input is ``post``'s ``corr`` (``-128 * sum_k w``)."""
        shifted = rows.dtype == torch.int8
        if kernel_requant(post):
            bias = self.biases(post)[0 if shifted else 1]
            return self.ext.pw_gemm_vnni(rows, self.wp, self.n, bias, post.mult, post.lo, post.hi, out_code(post.dtype))
        return post(self.ext.pw_gemm_vnni(rows, self.wp, self.n, _NO_BIAS, _NO_MULT, 0, 0, 0), shifted)


def avx2_ok(ext: Any) -> bool:
    """The C++ kernels were built with AVX2 (``pw_gemm_avx2``): what a CPU without VNNI multiplies codes with."""
    return ext is not None and hasattr(ext, "pw_gemm_avx2") and bool(ext.pw_avx2_available())


class Avx2Gemm(VnniGemm):
    """``pw_gemm_avx2``: the codes widened to int16 and multiplied by vpmaddwd (exact, int32; an int8 input
    read as ``x + 128`` as :class:`VnniGemm`), the float32-faithful requant fused per tile.

    For x86 CPUs without VNNI (AMD Zen 3 here): there ``torch._int_mm`` is a plain loop and an exact fp32
    matmul of the codes was the fastest exact GEMM; this one measured 1.2-1.9x that on 256- and 512-channel
    pointwise layers at 801 and 6400 rows (2 threads, one process, medians of 15 calls)."""

    def __init__(self, ext: Any, w: Tensor):
        self.ext, self.n = ext, int(w.shape[0])
        wp = padded_weight(w, 16, 2, torch.int16)
        nnb, kp = wp.shape[0] // 16, wp.shape[1] // 2
        self.wp = wp.view(nnb, 16, kp, 2).permute(0, 2, 1, 3).contiguous()  # (nnb, kp, 16 n, 2 k)
        self.w64t = w.to(torch.float64).t().contiguous()

    def run(self, rows: Tensor, post: Any) -> Tensor:
        """``post`` of ``rows @ w.T``, as :meth:`VnniGemm.run` (the kernel takes the int64 biases as they are)."""
        shifted = rows.dtype == torch.int8
        if kernel_requant(post):
            bias = post.bias_shifted if shifted else post.bias
            return self.ext.pw_gemm_avx2(rows, self.wp, self.n, bias, post.mult, post.lo, post.hi, out_code(post.dtype))
        return post(self.ext.pw_gemm_avx2(rows, self.wp, self.n, _NO_BIAS, _NO_MULT, 0, 0, 0), shifted)


def run_gemm(gemm: Any, post: Any, rows: Tensor) -> Tensor:
    """``post(rows @ w.T)`` with whatever input shift the GEMM needs."""
    if isinstance(gemm, VnniGemm) and rows.dtype in (torch.int8, torch.uint8):
        return gemm.run(rows.contiguous(), post)
    rows, shifted = gemm_input(gemm, rows)
    return post(gemm(rows), shifted)


def gemm_input(gemm: Any, rows: Tensor) -> tuple[Tensor, bool]:
    """(what the GEMM takes, whether a uint8 input was shifted to int8 ``x - 128``)."""
    if rows.dtype == torch.uint8 and gemm.int8_only and not gemm.takes_u8:
        return to_signed(rows), True
    return rows, False


# --------------------------------------------------------------------------- requantization


def _biases(channels: int, bias: Optional[Tensor], corr: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(bias, bias + the uint8 shift correction), int64 (C) each; an empty bias stands for none."""
    b = bias.to(torch.int64).reshape(-1).expand(channels).contiguous() if bias is not None else None
    plain = b if b is not None else torch.empty(0, dtype=torch.int64)
    if corr is None:
        return plain, plain
    return plain, (corr if b is None else b + corr).contiguous()


class Requant:
    """Per-column ``clamp(((acc + bias) * m + 2**(s-1)) >> s, lo, hi)`` of an (N, C) accumulator.

    ``corr``: the per-column ``128 * sum_k w`` that a GEMM of a shifted uint8 input lacks;
    ``__call__(acc, shifted=True)`` adds it to the bias.
    """

    def __init__(self, ext: Any, channels: int, bias: Optional[Tensor], m: Tensor, s: Tensor, lo: int, hi: int, bits: int,
                 corr: Optional[Tensor] = None, f32: bool = False):
        self.c = channels
        self.mult = f32_multipliers(m, s, channels) if f32 else None  # f32=True: float32 arithmetic (f32.py)
        self.m = m.to(torch.int64).reshape(-1).expand(channels).contiguous()
        self.s = s.to(torch.int64).reshape(-1).expand(channels).contiguous()
        self.half = torch.where(self.s > 0, torch.ones_like(self.s) << (self.s - 1).clamp_min(0), torch.zeros_like(self.s))
        self.bias, self.bias_shifted = _biases(channels, bias, corr)
        self.lo, self.hi, self.bits = int(lo), int(hi), int(bits)
        self.dtype = dtype_for_range(self.bits, self.lo, self.hi)
        ok = bool(((self.s >= 0) & (self.s <= 63)).all()) and self.dtype in (torch.int8, torch.uint8, torch.int16)
        self.ext = ext if (ext is not None and ok) else None
        self.emit_f32 = False  # set by the program when every consumer convolves in exact fp32
        # C++ f32 requant sums acc + bias exactly in double: |bias| < 2**52
        self.small_bias = all(int(t.abs().max()) < (1 << 52) if t.numel() else True for t in (self.bias, self.bias_shifted))

    def __call__(self, acc: Tensor, shifted: bool = False) -> Tensor:
        bias = self.bias_shifted if shifted else self.bias
        if self.mult is not None:
            if self.ext is not None and self.small_bias and acc.dtype in (torch.float32, torch.int32):
                code = 0 if self.emit_f32 else out_code(self.dtype)
                return self.ext.requant_f32_cols(acc.contiguous(), bias, self.mult, self.lo, self.hi, code)
            codes = requant_f32(acc, bias, self.mult, self.lo, self.hi)
            return codes if self.emit_f32 else codes.to(self.dtype)
        if self.ext is not None and acc.dtype in (torch.float32, torch.int32):
            code = 0 if self.emit_f32 else out_code(self.dtype)
            return self.ext.requant_cols(acc.contiguous(), bias, self.m, self.half, self.s, self.lo, self.hi, code)
        acc = acc.to(torch.int64)
        if bias.numel():
            acc = acc + bias
        return requant_reference(acc, self.m, self.s, acc.dim() - 1, self.lo, self.hi).to(self.dtype)


class Widen:
    """An accumulator op's output: ``(acc + bias)`` cast to its ``acc_bits`` dtype (as the reference casts)."""

    def __init__(self, channels: int, bias: Optional[Tensor], bits: int, corr: Optional[Tensor] = None):
        self.bias, self.bias_shifted = _biases(channels, bias, corr)
        self.dtype = dtype_for_bits(int(bits))

    def __call__(self, acc: Tensor, shifted: bool = False) -> Tensor:
        bias = self.bias_shifted if shifted else self.bias
        acc = acc.to(torch.int64)
        if bias.numel():
            acc = acc + bias
        return acc.to(self.dtype)


# --------------------------------------------------------------------------- layers


def max_abs(x_bits: int, unsigned: bool = False) -> int:
    """The largest |code| of an input: 2**(bits-1) signed (int8: 128), 2**bits - 1 unsigned (uint8: 255)."""
    return (1 << x_bits) - 1 if unsigned else 1 << (x_bits - 1)


def channel_bounds(w: Tensor, x_bits: int, unsigned: bool = False) -> Tensor:
    """Per output channel, sum |w| times max|x|: no accumulator of that channel can exceed it."""
    return w.to(torch.int64).abs().reshape(w.shape[0], -1).sum(1) * max_abs(x_bits, unsigned)


def weight_bound(w: Tensor, x_bits: int, unsigned: bool = False) -> int:
    """max over output channels of :func:`channel_bounds`: no accumulator can exceed it."""
    per = channel_bounds(w, x_bits, unsigned)
    return int(per.max()) if per.numel() else 0


class Conv:
    """conv1d/conv2d ``_rq`` (requantized) or ``_acc`` (accumulator) on channels-last storage.

    ``x_unsigned``: the plan says the input is uint8 (it sets the fp32 bound); the kernel
    still checks each call's dtype, and takes either exactly.
    """

    def __init__(self, ext: Any, a: dict[str, Any], x_bits: int, fused: bool, x_unsigned: bool = False):
        w = a["w"]
        self.dims = w.dim() - 2
        self.co = w.shape[0]
        self.stride, self.padding = list(a["stride"]), list(a["padding"])
        self.dilation, self.groups = list(a["dilation"]), int(a["groups"])
        bias = a.get("bias")
        self.x_unsigned = bool(x_unsigned) and x_bits <= 8
        self.bound = weight_bound(w, x_bits, self.x_unsigned)
        # a uint8 input on an fp32 convolution: sum|w| * 255 (what a call with a uint8 tensor must stay below)
        self.bound_u8 = weight_bound(w, 8, True)
        pointwise = (
            self.dims == 1 and w.shape[2] == 1 and self.groups == 1 and self.stride == [1] and self.padding == [0]
            and x_bits <= 8
        )
        corr = None
        depthwise_int = (  # a depthwise conv1d an int32-exact C++ kernel can take
            self.dims == 1 and self.groups == self.co == w.shape[0] and w.shape[1] == 1 and x_bits <= 8
            and self.bound_u8 < I32_EXACT
        )
        depthwise = depthwise_int and vnni_ok(ext)
        if depthwise:
            # AVX-512 VNNI on the 8-bit codes themselves (u8 x s8): an int8 input goes in as x + 128,
            # so its accumulator holds 128 * sum_k w more, taken off with the bias (``corr``)
            self.kind, self.ext = "dw-vnni", ext
            self.w_vnni, self.k = vnni_depthwise_weight(w), int(w.shape[2])
            self.acc_bound = channel_bounds(w, 8, unsigned=True)  # the kernel's u8 codes
            corr = -shift_correction(w)
            self.w64 = w.to(torch.float64)  # an input that is not 8-bit codes (never in a planned program)
        elif pointwise and vnni_ok(ext) and self.bound_u8 < I32_EXACT:
            self.gemm, self.kind = VnniGemm(ext, w[:, :, 0]), "pw-vnni"
            corr = -shift_correction(w[:, :, 0])  # an int8 input goes in as x + 128
        elif pointwise and avx2_ok(ext) and self.bound_u8 < I32_EXACT:
            self.gemm, self.kind = Avx2Gemm(ext, w[:, :, 0]), "pw-avx2"
            corr = -shift_correction(w[:, :, 0])
        elif depthwise_int and avx2_ok(ext) and hasattr(ext, "dw_conv1d_avx2"):
            # AVX2 without VNNI: the codes widened to int16 in tap pairs (vpmaddwd), int8 read as x + 128
            self.kind, self.ext = "dw-avx2", ext
            self.w_avx2, self.k = avx2_depthwise_weight(w), int(w.shape[2])
            corr = -shift_correction(w)
            self.w64 = w.to(torch.float64)  # an input that is not 8-bit codes (never in a planned program)
        elif pointwise:
            # a uint8 input is shifted to int8 first: the GEMM's bound is the signed one
            self.gemm, self.kind = make_gemm(w[:, :, 0], weight_bound(w, 8), self.x_unsigned)
            corr = shift_correction(w[:, :, 0]) if self.gemm.int8_only else None
        elif self.bound < F32_EXACT:
            self.kind = "f32-conv-cl"
            w4 = w.to(torch.float32)
            if self.dims == 1:
                w4 = w4.unsqueeze(2)
            self.w4 = w4.contiguous(memory_format=torch.channels_last)
            self.phases = dilation_phases(self.dims, self.stride, self.padding, self.dilation)
            pd = [p // self.phases for p in self.padding]
            dl = [1] if self.phases > 1 else self.dilation
            self.st = [1, *self.stride] if self.dims == 1 else self.stride
            self.pd = [0, *pd] if self.dims == 1 else self.padding
            self.dl = [1, *dl] if self.dims == 1 else self.dilation
            if self.bound_u8 >= F32_EXACT:  # a uint8 call would not be exact in fp32: float64 then
                self.w64 = w.to(torch.float64)
        else:
            self.kind = "f64-conv"
            self.w64 = w.to(torch.float64)
        if fused:
            self.post = Requant(ext, self.co, bias, a["m"], a["s"], a["lo"], a["hi"], a["bits"], corr,
                                f32=bool(a.get("f32", False)))
        else:
            self.post = Widen(self.co, bias, a["acc_bits"], corr)
        # exact fp32 integers may travel between layers (no int8 -> fp32 copy before a convolution)
        self.takes_f32 = (self.kind == "f32-conv-cl" and self.dims == 1) or self.kind == "f32-matmul"
        self.can_emit_f32 = (
            fused and self.dims == 1 and isinstance(self.post, Requant) and self.post.ext is not None
            and self.kind not in ("dw-vnni", "dw-avx2")
        )
        self.call_cl = self._channels_last_call()

    def _channels_last_call(self):
        """One C++ call for a fused VNNI conv on 8-bit codes, layout glue included (``*_conv1d_cl``), or None:
        the float32-faithful requant runs inside the kernel, its int32 accumulators never reach memory."""
        p = self.post
        if self.vnni_fused:
            ext, w4, geo = p.ext, self.w_vnni, (self.k, self.stride[0], self.padding[0], self.dilation[0])
            args = (*vnni_biases(p, self.acc_bound), p.mult, p.lo, p.hi, out_code(p.dtype))
            return lambda x: ext.dw_conv1d_cl(x, w4, *geo, *args)
        if self.kind == "pw-vnni" and kernel_requant(p):
            ext, wp, n = p.ext, self.gemm.wp, self.gemm.n
            args = (*self.gemm.biases(p), p.mult, p.lo, p.hi, out_code(p.dtype))
            return lambda x: ext.pw_conv1d_cl(x, wp, n, *args)
        return None

    @property
    def vnni_fused(self) -> bool:
        """A depthwise VNNI conv whose requant runs inside the kernel."""
        return self.kind == "dw-vnni" and kernel_requant(self.post)

    @property
    def emit_f32(self) -> bool:
        return getattr(self.post, "emit_f32", False)

    @emit_f32.setter
    def emit_f32(self, on: bool) -> None:
        self.post.emit_f32 = bool(on) and self.can_emit_f32
        self.call_cl = self._channels_last_call()  # an fp32 output is not the fused kernels' own

    def __call__(self, x: Tensor) -> Tensor:
        if self.call_cl is not None and x.dtype in _EIGHT and x.dim() == 3:
            return self.call_cl(x)
        if self.kind == "dw-vnni" and x.dtype in _EIGHT:
            return self._call_vnni(x)
        if self.kind == "dw-avx2" and x.dtype in _EIGHT and x.dim() == 3:
            return self._call_avx2(x)
        if self.kind in ("f64-conv", "dw-vnni", "dw-avx2") or (
            self.kind == "f32-conv-cl" and x.dtype == torch.uint8 and self.bound_u8 >= F32_EXACT
        ):
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
                out = run_gemm(self.gemm, self.post, xt.reshape(b * t, c))
                return out.view(b, t, self.co).transpose(1, 2)
            xf = x.transpose(1, 2)
            if self.phases > 1:
                return self._call_phases(xf)
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

    def _call_vnni(self, x: Tensor) -> Tensor:
        """Depthwise conv1d on the 8-bit codes (``dw_conv1d_vnni``) whose requant is not the kernel's own
        (accumulator output or a dyadic pair): int32 accumulators, then ``post``. A fused one is ``call_cl``."""
        xt = x.transpose(1, 2)
        xt = xt if xt.is_contiguous() else xt.contiguous()
        shifted = x.dtype == torch.int8  # the kernel reads int8 codes as x + 128
        geo = (self.k, self.stride[0], self.padding[0], self.dilation[0])
        acc = self.ext.dw_conv1d_vnni(xt, self.w_vnni, *geo, _NO_BIAS, _NO_MULT, 0, 0, 0)
        b, t, c = acc.shape
        return self.post(acc.view(b * t, c), shifted).view(b, t, c).transpose(1, 2)

    def _call_avx2(self, x: Tensor) -> Tensor:
        """Depthwise conv1d on the 8-bit codes (``dw_conv1d_avx2``), the float32-faithful requant fused in
        where it is ``post``'s, else int32 accumulators and then ``post``."""
        xt = x.transpose(1, 2)
        xt = xt if xt.is_contiguous() else xt.contiguous()
        shifted = x.dtype == torch.int8  # the kernel reads int8 codes as x + 128
        geo = (self.k, self.stride[0], self.padding[0], self.dilation[0])
        p = self.post
        if kernel_requant(p):
            bias = p.bias_shifted if shifted else p.bias
            return self.ext.dw_conv1d_avx2(xt, self.w_avx2, *geo, bias, p.mult, p.lo, p.hi, out_code(p.dtype)).transpose(1, 2)
        acc = self.ext.dw_conv1d_avx2(xt, self.w_avx2, *geo, _NO_BIAS, _NO_MULT, 0, 0, 0)
        b, t, c = acc.shape
        return p(acc.view(b * t, c), shifted).view(b, t, c).transpose(1, 2)

    def _call_phases(self, xf: Tensor) -> Tensor:
        """A dilated stride-1 conv1d as an undilated one over each of the ``d`` time phases.

        oneDNN has no fast kernel for a dilated depthwise conv (QuartzNet's k=87,
        dilation 2 layer: 117 ms against 0.4 ms undilated here); with ``pad = d*q``,
        ``y[d*u + p] = sum_k w[k] x[d*(u + k - q) + p]``, so phase ``p`` of the output is
        the undilated conv (padding ``q``) of phase ``p`` of the input. The same
        products and sums: exact as the direct call.
        """
        b, t, c = xf.shape
        d = self.phases
        tp = -(-t // d) * d  # zero frames past the end are what the padding holds anyway
        xs = torch.zeros((b, tp, c), dtype=torch.float32)
        xs[:, :t].copy_(xf)
        xs = xs.view(b, tp // d, d, c).transpose(1, 2).contiguous()  # (b, d, tp/d, c)
        acc = torch.nn.functional.conv2d(xs.permute(0, 3, 1, 2), self.w4, None, self.st, self.pd, self.dl, self.groups)
        acc = acc.contiguous(memory_format=torch.channels_last)
        n, co, _, length = acc.shape
        out = self.post(acc.permute(0, 2, 3, 1).reshape(n * d * length, co))  # per-column: row order is free
        tout = t + 2 * self.padding[0] - self.dilation[0] * (self.w4.shape[-1] - 1)
        out = out.view(n, d, length, co).transpose(1, 2).reshape(n, length * d, co)[:, :tout]
        return out.contiguous().transpose(1, 2)


_NO_BIAS = torch.empty(0, dtype=torch.int64)
_EIGHT = (torch.int8, torch.uint8)
_NO_MULT = torch.empty(0, dtype=torch.float32)


def vnni_depthwise_weight(w: Tensor) -> Tensor:
    """A depthwise weight (C, 1, K) in ``dw_conv1d_vnni``'s order: int8 (ceil(C/64), ceil(K/4), 4 j, 4 L, 4 i, 4 taps).

    Channel ``64*cb + 16L + 4j + i``, taps ``4kq..4kq+3``; zeros past C and past K (the
    kernel's register layout after its byte/word unpacks, see the C++ comment)."""
    c, _, k = w.shape
    kq, ncb = -(-k // 4), -(-c // 64)
    wp = torch.zeros(ncb * 64, 4 * kq, dtype=torch.int8)
    wp[:c, :k] = w[:, 0]
    return wp.view(ncb, 4, 4, 4, kq, 4).permute(0, 4, 2, 1, 3, 5).contiguous()


# the order of 16 channels in dw_conv1d_avx2's two accumulator vectors (its word unpacks' lanes)
_AVX2_DW_ORDER = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]


def avx2_depthwise_weight(w: Tensor) -> Tensor:
    """A depthwise weight (C, 1, K) in ``dw_conv1d_avx2``'s order: int16 (ceil(C/16), ceil(K/2), 16, 2),
    the 16 channels of a block in ``_AVX2_DW_ORDER``, taps ``2kp, 2kp+1``; zeros past C and K."""
    wp = padded_weight(w[:, 0], 16, 2, torch.int16)
    ncb, kp = wp.shape[0] // 16, wp.shape[1] // 2
    return wp.view(ncb, 16, kp, 2)[:, _AVX2_DW_ORDER].permute(0, 2, 1, 3).contiguous()


def dilation_phases(dims: int, stride: list[int], padding: list[int], dilation: list[int]) -> int:
    """``d`` where a conv1d of dilation ``d > 1`` runs as ``d`` undilated ones (stride 1, padding a multiple of d); else 1."""
    if dims == 1 and stride == [1] and dilation[0] > 1 and padding[0] % dilation[0] == 0:
        return dilation[0]
    return 1


class Linear:
    """linear ``_rq`` / ``_acc`` over the last dimension."""

    def __init__(self, ext: Any, a: dict[str, Any], x_bits: int, fused: bool, x_unsigned: bool = False):
        w = a["w"]
        self.n = w.shape[0]
        if x_bits <= 8 and vnni_ok(ext) and weight_bound(w, 8, True) < I32_EXACT:
            self.gemm, self.kind = VnniGemm(ext, w), "pw-vnni"
            corr = -shift_correction(w)  # an int8 input goes in as x + 128
        elif x_bits <= 8 and avx2_ok(ext) and weight_bound(w, 8, True) < I32_EXACT:
            self.gemm, self.kind = Avx2Gemm(ext, w), "pw-avx2"
            corr = -shift_correction(w)
        else:
            # an 8-bit input (a uint8 one shifted to int8 first) is bounded by sum|w| * 128
            self.gemm, self.kind = make_gemm(w, weight_bound(w, 8), bool(x_unsigned)) if x_bits <= 8 else (F64MM(w), "f64-matmul")
            corr = shift_correction(w) if self.gemm.int8_only else None
        bias = a.get("bias")
        if fused:
            self.post = Requant(ext, self.n, bias, a["m"], a["s"], a["lo"], a["hi"], a["bits"], corr,
                                f32=bool(a.get("f32", False)))
        else:
            self.post = Widen(self.n, bias, a["acc_bits"], corr)

    def __call__(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        out = run_gemm(self.gemm, self.post, x.reshape(-1, x.shape[-1]).contiguous())
        return out.view(*lead, self.n)


class Quantize:
    """The input quantizer in C++ (float32 quotient, half to even, as the reference), written channels-last."""

    def __init__(self, ext: Any, a: dict[str, Any]):
        self.scale, self.bits = float(a["scale"]), int(a["bits"])
        self.ext = ext if self.bits <= 8 and self.scale > 0 else None
        self.can_emit_f32 = self.ext is not None
        self.emit_f32 = False

    def __call__(self, x: Tensor) -> Tensor:
        if self.ext is None or x.dim() != 3 or x.dtype != torch.float32:
            return torch.ops.qpipe.quantize(x, self.scale, self.bits)
        q, undecided = self.ext.quantize_cl(x, self.scale, (1 << (self.bits - 1)) - 1, self.emit_f32)
        if undecided:  # a NaN input: whatever integer the reference's cast makes of it
            ref = torch.ops.qpipe.quantize(x, self.scale, self.bits).transpose(1, 2)
            q = ref.to(torch.float32 if self.emit_f32 else ref.dtype).contiguous()
        return q.transpose(1, 2)


class AddRequant:
    """``clamp((a*ma + b*mb + 2**(s-1)) >> s)``: C++ on two tensors of one layout, else the reference."""

    def __init__(self, ext: Any, a: dict[str, Any]):
        self.ma, self.mb, self.s = a["ma"], a["mb"], a["s"]
        self.lo, self.hi, self.bits = int(a["lo"]), int(a["hi"]), int(a["bits"])
        self.dtype = dtype_for_range(self.bits, self.lo, self.hi)
        scalar = all(t.numel() == 1 for t in (self.ma, self.mb, self.s))
        ok = scalar and 0 <= int(self.s.reshape(-1)[0]) <= 63 and self.dtype in (torch.int8, torch.uint8, torch.int16)
        self.ext = ext if ok else None
        if self.ext is not None:
            self.args = (int(self.ma.reshape(-1)[0]), int(self.mb.reshape(-1)[0]), int(self.s.reshape(-1)[0]))
            self.code = out_code(self.dtype)

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        if self.ext is not None and a.dtype in _EIGHT and b.dtype in _EIGHT:
            out = self.ext.add_rq_cl(a, b, *self.args, self.lo, self.hi, self.code)  # None: a layout it does not take
            if out is not None:
                return out
        v = a.to(torch.int64) * self.ma.to(torch.int64) + b.to(torch.int64) * self.mb.to(torch.int64)
        return round_shift(v, self.s).clamp(self.lo, self.hi).to(self.dtype)
