"""Timing of the torch-int8 target's kernel variants for one depthwise layer and
one pointwise layer of QuartzNet 15x5 (16 s of audio), ratios within one run.

    .venv/bin/python tools/bench/torch_int8_kernels.py [--batch 8] [--threads 2] [--channels 512] [--kernel 63]

Depthwise variants: torch fp32 conv1d (what the float model runs), fp32 conv2d
channels-last, a shifted multiply-add in channels-last (eager and under
torch.compile), unfold + bmm, oneDNN's int8 qconv (fp32 out), and the C++
kernel (fp32 accumulators, requant fused). Pointwise: fp32 matmul, torch._int_mm,
oneDNN qlinear (AMX/VNNI brgemm, fp32 out), bf16 matmul. Each variant's result
is checked against the exact integer accumulator before it is timed.
"""
from __future__ import annotations

import argparse

import torch
from _kernel_timing import median_us


def bench(fn, reps: int) -> float:
    """Median ms of ``reps`` calls after two untimed ones."""
    return median_us(fn, reps, warmup=2) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument("--kernel", type=int, default=63)
    ap.add_argument("--frames", type=int, default=801)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from qpipe.backends._torch_int8 import cpu_ext

    B, C, T, K = a.batch, a.channels, a.frames, a.kernel
    pad = K // 2
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-127, 128, (B, C, T), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (C, 1, K), generator=g, dtype=torch.int8)
    exact = torch.nn.functional.conv1d(x.double(), w.double(), padding=pad, groups=C)
    xf, wf = x.float(), w.float()
    xcl = x.transpose(1, 2).contiguous()  # (B, T, C)
    res: dict[str, float] = {}

    def check(name, got):
        assert torch.equal(got.double(), exact), name

    res["dw fp32 conv1d (torch)"] = bench(lambda: torch.nn.functional.conv1d(xf, wf, padding=pad, groups=C), a.reps)
    check("conv1d", torch.nn.functional.conv1d(xf, wf, padding=pad, groups=C))
    x4 = xf.unsqueeze(2).contiguous(memory_format=torch.channels_last)
    w4 = wf.unsqueeze(2).contiguous(memory_format=torch.channels_last)
    f = lambda: torch.nn.functional.conv2d(x4, w4, padding=(0, pad), groups=C)
    res["dw fp32 conv2d channels-last"] = bench(f, a.reps)
    check("conv2d cl", f().squeeze(2))

    wk = wf[:, 0, :].t().contiguous()  # (K, C)

    def shifted(xc):  # xc: (B, T, C) fp32
        xp = torch.nn.functional.pad(xc, (0, 0, pad, pad))
        acc = xp[:, 0:T] * wk[0]
        for k in range(1, K):
            acc = acc + xp[:, k:k + T] * wk[k]
        return acc

    xclf = xcl.float()
    res["dw shifted-FMA channels-last eager"] = bench(lambda: shifted(xclf), max(2, a.reps // 2))
    check("shifted", shifted(xclf).transpose(1, 2))
    if not a.no_compile:
        try:
            cs = torch.compile(shifted, dynamic=False)
            check("compiled", cs(xclf).transpose(1, 2))
            res["dw shifted-FMA torch.compile (inductor)"] = bench(lambda: cs(xclf), a.reps)
        except Exception as exc:  # noqa: BLE001
            print("torch.compile failed:", type(exc).__name__, str(exc).splitlines()[0])

    def unfold_bmm():
        xp = torch.nn.functional.pad(xf, (pad, pad))
        u = xp.unfold(2, K, 1)  # (B, C, T, K)
        return torch.einsum("bctk,ck->bct", u, wf[:, 0, :])

    res["dw unfold + einsum"] = bench(unfold_bmm, max(2, a.reps // 2))
    check("unfold", unfold_bmm())
    try:
        qx = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        ones = torch.ones(C)
        zp = torch.zeros(C, dtype=torch.long)
        qw = torch.ops.onednn.qconv_prepack(w.unsqueeze(2), ones, 1.0, 0, [1, 1], [0, pad], [1, 1], C, list(qx.shape))
        f = lambda: torch.ops.onednn.qconv_pointwise(qx, 1.0, 0, qw, ones, zp, None, [1, 1], [0, pad], [1, 1], C, 1.0, 0, torch.float32, "none", [], "")
        check("qconv", f().squeeze(2))
        res["dw oneDNN qconv int8 (fp32 out)"] = bench(f, a.reps)
    except Exception as exc:  # noqa: BLE001
        print("oneDNN qconv failed:", type(exc).__name__, str(exc).splitlines()[0][:200])
    ext = cpu_ext.get()
    if ext is not None:
        wp = torch.zeros(K, (C + 15) // 16 * 16)
        wp[:, :C] = wk
        one = torch.ones(C, dtype=torch.int64)
        zero = torch.zeros(C, dtype=torch.int64)
        # m=1, s=0, wide clamp: the output is the accumulator itself (int16 holds it only when small, so check via fp)
        f = lambda: ext.dw_conv1d_rq(xcl, wp, torch.empty(0, dtype=torch.int64), one, zero, zero, 1, pad, 1, -127, 127, 8)
        res["dw C++ kernel (fp32 acc, requant fused, int8 out)"] = bench(f, a.reps)
        exact_rq = exact.clamp(-127, 127).to(torch.int8)
        assert torch.equal(f().transpose(1, 2), exact_rq), "C++ dw"
    else:
        print("C++ kernels unavailable:", cpu_ext.why_not())

    # pointwise C -> C over B*T rows
    M = B * T
    xa = torch.randint(-127, 128, (M, C), generator=g, dtype=torch.int8)
    wb = torch.randint(-127, 128, (C, C), generator=g, dtype=torch.int8)  # (Cout, Cin)
    ex = xa.double() @ wb.double().t()
    xaf, wbt = xa.float(), wb.float().t().contiguous()
    res["pw fp32 matmul"] = bench(lambda: xaf @ wbt, a.reps)
    Mp = (M + 7) // 8 * 8
    xpad = torch.zeros(Mp, C, dtype=torch.int8)
    xpad[:M] = xa
    wbt8 = wb.t().contiguous()
    res["pw torch._int_mm"] = bench(lambda: torch._int_mm(xpad, wbt8), a.reps)
    assert torch.equal(torch._int_mm(xpad, wbt8)[:M].double(), ex)
    packed = torch.ops.onednn.qlinear_prepack(wb, [M, C])
    ones, zp = torch.ones(C), torch.zeros(C, dtype=torch.long)
    f = lambda: torch.ops.onednn.qlinear_pointwise(xa, 1.0, 0, packed, ones, zp, None, 1.0, 0, torch.float32, "none", [], "")
    assert torch.equal(f().double(), ex)
    res["pw oneDNN qlinear (fp32 out)"] = bench(f, a.reps)
    xab, wbb = xa.bfloat16(), wbt.bfloat16()
    res["pw bf16 matmul (not exact: bf16 out)"] = bench(lambda: xab @ wbb, a.reps)

    base_dw = res["dw fp32 conv1d (torch)"]
    base_pw = res["pw fp32 matmul"]
    print(f"batch {B}, {C} channels, {T} frames, depthwise K={K}, {a.threads} threads (median ms; ratio = fp32 baseline / variant)")
    for k, v in res.items():
        base = base_dw if k.startswith("dw") else base_pw
        print(f"  {k:55s} {v:9.2f} ms  x{base / v:6.2f}")


if __name__ == "__main__":
    main()
