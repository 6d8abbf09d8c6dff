"""Timing of the C++ step kernels the torch-int8 program runs on a VNNI CPU, at QuartzNet's shapes.

    .venv/bin/python tools/bench/torch_int8_steps.py [--batch 1] [--threads 2] [--rounds 5] [--calls 100]

Steps: the input quantizer (64 mel bins x 1601 frames -> channels-last codes), the residual add
(``add_rq``), a pointwise layer with its requant fused (``pw_gemm_vnni``) and a depthwise one
(``dw_conv1d_vnni``, k=33). (A residual add fused into the pointwise epilogue was tried and measured
here: no faster at batch 1, 22 % slower at batch 8; the add is bound by its double arithmetic, not by
memory, so it was not kept.)
Every result is checked against the ``qpipe::`` reference op before it is timed. One process; the
variants' order rotates every round; the figure is the median over rounds of each round's median.
Microseconds on a shared machine move between runs: compare the rows of one run.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
from _kernel_timing import rotated_medians


def _cases(ext, batch: int, channels: int, frames: int) -> dict[str, Callable[[], object]]:
    import qpipe.ir.ops  # noqa: F401  (the reference ops)
    from qpipe.backends._torch_int8 import cpu
    from qpipe.ir.ops.kernels import f32_multiplier

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(batch, 64, 2 * frames - 1, generator=g) * 3
    cases: dict[str, Callable[[], object]] = {}
    q = cpu.Quantize(ext, dict(scale=0.0371, bits=8))
    assert torch.equal(q(feats), torch.ops.qpipe.quantize(feats, 0.0371, 8)), "quantize"
    cases["quantize 64 x 1601 -> int8 channels-last"] = lambda: q(feats)

    shape = (batch, channels, frames)
    a = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8).transpose(1, 2).contiguous().transpose(1, 2)
    r = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).transpose(1, 2).contiguous().transpose(1, 2)
    add_args = dict(ma=torch.tensor(1062955517), mb=torch.tensor(1914228424), s=torch.tensor(30), lo=0, hi=255, bits=8)
    add = cpu.AddRequant(ext, add_args)
    want_add = torch.ops.qpipe.add_requant(a, r, *(add_args[k] for k in ("ma", "mb", "s", "lo", "hi", "bits")))
    assert torch.equal(add(a, r), want_add), "add"
    cases[f"add_rq {channels} ch"] = lambda: add(a, r)

    w = torch.randint(-127, 128, (channels, channels, 1), generator=g, dtype=torch.int8)
    bias = torch.randint(-(2**20), 2**20, (channels,), generator=g, dtype=torch.int32)
    m, s = f32_multiplier(3e-4)
    rq = dict(m=torch.tensor([m]), s=torch.tensor([s]), lo=-128, hi=127, bits=8)
    conv = cpu.Conv(ext, dict(w=w, bias=bias, stride=[1], padding=[0], dilation=[1], groups=1, f32=True, **rq), 8, fused=True)
    assert conv.kind == "pw-vnni", conv.kind
    x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).transpose(1, 2).contiguous().transpose(1, 2)
    y = torch.ops.qpipe.conv1d_rq(x, w, bias, rq["m"], rq["s"], [1], [0], [1], 1, -128, 127, 8, True)
    assert torch.equal(conv(x), y), "pw"
    cases[f"pw {channels}->{channels} requant fused"] = lambda: conv(x)
    wd = torch.randint(-127, 128, (channels, 1, 33), generator=g, dtype=torch.int8)
    dw = cpu.Conv(ext, dict(w=wd, bias=bias, stride=[1], padding=[16], dilation=[1], groups=channels, f32=True, **rq), 8,
                  fused=True)
    assert dw.kind == "dw-vnni", dw.kind
    want = torch.ops.qpipe.conv1d_rq(x, wd, bias, rq["m"], rq["s"], [1], [16], [1], channels, -128, 127, 8, True)
    assert torch.equal(dw(x), want), "dw"
    cases[f"dw {channels} ch k=33 requant fused"] = lambda: dw(x)
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--frames", type=int, default=801)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=100)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from qpipe.backends._torch_int8 import cpu, cpu_ext

    ext = cpu_ext.get()
    if ext is None or not cpu.vnni_ok(ext):
        raise SystemExit(f"torch_int8_steps: needs the C++ kernels with AVX-512 VNNI ({cpu_ext.why_not() or 'no VNNI here'})")
    cases = _cases(ext, a.batch, a.channels, a.frames)
    medians = rotated_medians(cases, a.rounds, a.calls)
    print(f"batch {a.batch}, {a.channels} channels, {a.frames} frames, {a.threads} threads; "
          f"median over {a.rounds} rounds of {a.calls} calls (us)")
    for n, us in medians.items():
        print(f"  {n:48s} {us:9.1f}")


if __name__ == "__main__":
    main()
