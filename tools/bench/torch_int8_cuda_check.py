"""torch-int8 on CUDA: bit-exact with the CPU reference, and timed against torch fp32/fp16 at batch 8.

    .venv/bin/python tools/bench/torch_int8_cuda_check.py [--models demo,quartznet_15x5] [--batch 8]
        [--frames 1601] [--rounds 10] [--work /tmp/qpipe_ti8_bench]

Uses the same cached models and folders as tools/bench/torch_int8_models.py
(made on first use). On a machine without CUDA it says so in one line and exits 2.
Prints, per model: the kernels the CUDA program chose, whether its logits equal
the CPU reference program's at batch 1 and --batch, and median ms (CUDA-synchronized)
of the float graph in fp32 and fp16 and of torch-int8, with the ratios.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def timed(fn, x, rounds: int) -> float:
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn(x)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,quartznet_15x5")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=1601)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--work", default="/tmp/qpipe_ti8_bench")
    a = ap.parse_args()
    from qpipe.ir.errors import QpipeError
    from qpipe.backends.torch_int8 import check_device, load_program
    from qpipe.backends import open_folder

    try:
        dev = check_device("cuda")
    except QpipeError as exc:
        print(f"torch_int8_cuda_check: {exc}")
        return 2
    from torch_int8_models import prepare, reference_runner

    os.makedirs(a.work, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(dev)}, {a.frames} frames", flush=True)
    all_exact = True
    for name in a.models.split(","):
        fpath, ti8, ref = prepare(name, a.work)
        meta = open_folder(ti8).meta
        mult = int(meta["input"].get("time_multiple", 1) or 1)
        t = (a.frames // mult) * mult
        prog = load_program(ti8, device=dev)
        kinds: dict[str, int] = {}
        for k in prog.kernels.values():
            kinds[k] = kinds.get(k, 0) + 1
        print(f"{name}: kernels {kinds}", flush=True)
        ref_runner = reference_runner(ref)
        for b in sorted({1, a.batch}):
            x = torch.randn(b, 64, t, generator=torch.Generator().manual_seed(b))
            want = ref_runner.logits_int(x)
            got = prog(x).cpu()
            same = got.dtype == want.dtype and torch.equal(got, want)
            all_exact &= same
            diff = "" if same else f" (max |diff| {int((got.to(torch.int64) - want.to(torch.int64)).abs().max())})"
            print(f"  batch {b}: CUDA int8 logits bit-exact with the CPU reference: {same}{diff}", flush=True)
        x = torch.randn(a.batch, 64, t, generator=torch.Generator().manual_seed(0)).to(dev)
        fmod = torch.export.load(fpath).module().to(dev)
        res = {}
        with torch.no_grad():
            res["torch fp32"] = timed(fmod, x, a.rounds)
            with torch.autocast("cuda", dtype=torch.float16):
                res["torch fp16 (autocast)"] = timed(fmod, x, a.rounds)
            res["qpipe torch-int8 CUDA"] = timed(prog, x, a.rounds)
        base = res["torch fp32"]
        print(f"  batch {a.batch}: " + ", ".join(f"{k} {v:.2f} ms (x{base / v:.2f})" for k, v in res.items()), flush=True)
    print("bit-exact on every model and batch:", all_exact)
    return 0 if all_exact else 1


if __name__ == "__main__":
    sys.exit(main())
