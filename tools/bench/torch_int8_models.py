"""torch-int8 against torch fp32 eager (and ORT fp32) on whole models, ratios from one run.

    .venv/bin/python tools/bench/torch_int8_models.py [--models demo,quartznet_15x5] [--batches 1,8]
        [--frames 1601] [--threads 2] [--rounds 5] [--work /tmp/qpipe_ti8_bench] [--ort]

For each model: the float graph (torch.export of the NeMo encoder+decoder, as
qpipe loads it) run eagerly in fp32, and the torch-int8 folder opened through
``open_folder(...).runner.logits_int``; candidates alternate within each round
(shared machines are noisy: compare the ratios). The first run checks the
torch-int8 logits are bit-identical to the reference program's. Models and
folders are cached in --work (the demo from models/demo_quartznet.nemo, 15x5 from
``build_random_nemo``), quantized with a short calibration (speed does not
depend on it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

FAST = "fold-bn,insert-observers,calibrate-synthetic{steps=20,batch=4,length=48,lr=0.05},substitute-int-ops,fuse-requant,eliminate-dead-float"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def prepare(name: str, work: str):
    from qpipe.api import load_model, quantize

    src = os.path.join(ROOT, "models", "demo_quartznet.nemo") if name == "demo" else os.path.join(work, f"{name}.nemo")
    if name != "demo" and not os.path.exists(src):
        from qpipe.frontends.nemo_configs import build_random_nemo

        build_random_nemo(name, src)
    fpath = os.path.join(work, f"{name}_float.pt2")
    ti8 = os.path.join(work, f"{name}_torch_int8")
    ref = os.path.join(work, f"{name}_reference.pt2")  # the reference program of the same integer graph
    if not (os.path.exists(fpath) and os.path.isdir(ti8) and os.path.exists(ref)):
        from qpipe.backends.reference import export_integer

        fm = load_model(src)
        ep = torch.export.export(fm.gm, tuple(fm.example_inputs), dynamic_shapes=({0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO},), strict=False)
        torch.export.save(ep, fpath)
        r = quantize(fm, FAST, output=ti8, target="torch-int8", force=True, progress=False)
        torch.export.save(export_integer(r.gm, fm.example_inputs[0], fm.time_dim), ref)
    return fpath, ti8, ref


def reference_runner(ref: str):
    import qpipe.ir.ops  # noqa: F401
    from qpipe.backends.reference import ReferenceRunner

    return ReferenceRunner(torch.export.load(ref).module())


def ort_session(fpath: str, work: str, name: str, threads: int):
    import onnxruntime as ort

    onnx_path = os.path.join(work, f"{name}_float.onnx")
    if not os.path.exists(onnx_path):
        ep = torch.export.load(fpath)
        torch.onnx.export(ep.module(), (torch.randn(1, 64, 1601),), onnx_path, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "B", 2: "T"}, "y": {0: "B", 1: "T"}}, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x.numpy()})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,quartznet_15x5")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--frames", type=int, default=1601)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", default="/tmp/qpipe_ti8_bench")
    ap.add_argument("--ort", action="store_true", help="also ORT fp32 (exports the float graph to ONNX once)")
    ap.add_argument("--profile", action="store_true", help="print the torch profiler's top ops of torch-int8")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    torch.set_num_threads(a.threads)
    from qpipe.backends import open_folder

    print(f"torch {torch.__version__}, {a.threads} threads, {a.frames} frames", flush=True)
    for name in a.models.split(","):
        fpath, ti8, ref = prepare(name, a.work)
        float_mod = torch.export.load(fpath).module()
        qm = open_folder(ti8)
        runner = qm.runner
        ref_runner = reference_runner(ref)
        mult = int(qm.meta["input"].get("time_multiple", 1) or 1)
        kinds = {}
        for k in runner.program.kernels.values():
            kinds[k] = kinds.get(k, 0) + 1
        print(f"{name}: kernels {kinds}", flush=True)
        cands = {"torch fp32 eager": lambda x: float_mod(x), "qpipe torch-int8": lambda x: qm.logits_int(x)}
        if a.ort:
            try:
                cands["ORT fp32"] = ort_session(fpath, a.work, name, a.threads)
            except Exception as exc:  # noqa: BLE001
                print("ORT fp32 unavailable:", type(exc).__name__, str(exc).splitlines()[0][:200])
        for b in (int(v) for v in a.batches.split(",")):
            x = torch.randn(b, 64, a.frames, generator=torch.Generator().manual_seed(b))
            t = (a.frames // mult) * mult
            same = torch.equal(qm.logits_int(x), ref_runner.logits_int(x[:, :, :t].contiguous()))
            times = {k: [] for k in cands}
            with torch.no_grad():
                for f in cands.values():
                    f(x)
                for r in range(a.rounds):
                    order = list(cands)[r % len(cands):] + list(cands)[: r % len(cands)]
                    for k in order:
                        t0 = time.perf_counter()
                        cands[k](x)
                        times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            base = med["torch fp32 eager"]
            line = ", ".join(f"{k} {v:.1f} ms (x{base / v:.2f})" for k, v in med.items())
            print(f"  {name} batch {b}: {line}; bit-exact vs reference: {same}", flush=True)
            if a.profile:
                from torch.profiler import profile

                with profile() as p:
                    qm.logits_int(x)
                print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    return 0


if __name__ == "__main__":
    sys.exit(main())
