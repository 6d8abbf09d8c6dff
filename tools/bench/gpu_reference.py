#!/usr/bin/env python3
"""Benchmark: qpipe's reference integer program on a GPU against the float model.

The integer program that ``qpipe MODEL -o OUT`` writes (``model.pt2``) is the
reference semantics, not a fast kernel: convolutions run in an exact float dtype
(float64 where int32 accumulation could exceed float32's 24-bit mantissa) and requant
in int64. Fast int8 kernels are the backends' job (ROADMAP item 2). This bench records
where the reference stands so that the backends have a baseline, and checks one
property the reference must keep on any device: integer logits on CUDA are
bit-identical to those on the CPU.

Two steps, because the GPU machine has no NeMo:

    # here (NeMo installed): float and integer programs of one model into DIR
    python tools/bench/gpu_reference.py prepare models/demo_quartznet.nemo DIR
    # on the GPU machine (torch with CUDA, qpipe's source tree):
    python tools/bench/gpu_reference.py run DIR --json results.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

DEVICE = "cuda"  # a CPU smoke test of the script sets this to "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def cast_weights(ep, dtype) -> None:
    """Cast an ExportedProgram's floating-point weights in place (parameters stay
    parameters: the program's verifier insists)."""
    import torch

    for k, v in list(ep.state_dict.items()):
        if v.is_floating_point() and v.dtype != dtype:
            c = v.detach().to(dtype)
            ep.state_dict[k] = torch.nn.Parameter(c, requires_grad=False) \
                if isinstance(v, torch.nn.Parameter) else c


def prepare(nemo: str, out_dir: str, half_weights: bool = False) -> int:
    import torch

    import qpipe.api as qp

    os.makedirs(out_dir, exist_ok=True)
    fm = qp.load_model(nemo)
    x = fm.example_inputs[0]
    dims = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO}
    ep = torch.export.export(fm.gm, (x,), dynamic_shapes=(dims,), strict=False)
    if half_weights:  # half the file (the GPU machine takes 64 MiB); `run` casts back to fp32
        cast_weights(ep, torch.float16)
    torch.export.save(ep, os.path.join(out_dir, "float.pt2"))
    qp.quantize(fm, passes="default", output=os.path.join(out_dir, "int8"), force=True)
    with open(os.path.join(out_dir, "prepared.json"), "w") as f:
        json.dump({"source": os.path.basename(nemo), "feat_in": int(x.shape[1]),
                   "torch": torch.__version__,
                   "float_weights_stored": "fp16" if half_weights else "fp32"}, f)
    print(f"prepared {out_dir}: float.pt2, int8/ from {nemo}")
    return 0


def _moved(module, device: str, half: bool = False):
    """A copy of an unlifted ``torch.export`` module on ``device``: its parameters and
    buffers, and the plain tensor attributes (lifted constants) ``.to()`` leaves behind."""
    import copy

    import torch

    m = copy.deepcopy(module).to(device)
    if half:
        m = m.half()
    for sub in m.modules():
        for name, v in list(vars(sub).items()):
            if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
                v = v.to(device)
                setattr(sub, name, v.half() if half and v.is_floating_point() else v)
    return m


def _time(fn, x, sync, repeats: int) -> dict:
    for _ in range(3):
        fn(x)
    sync()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        sync()
        ts.append(time.perf_counter() - t)
    return {"median_ms": round(1e3 * statistics.median(ts), 3),
            "min_ms": round(1e3 * min(ts), 3), "repeats": repeats}


def run(prep_dir: str, json_path: str | None, repeats: int, batches=(1, 16, 64)) -> int:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    if not os.path.isfile(os.path.join(prep_dir, "prepared.json")):
        print(f"{prep_dir} was not made by `gpu_reference.py prepare` (no prepared.json)",
              file=sys.stderr)
        return 2
    return _run(prep_dir, json_path, repeats, batches)


def _run(prep_dir: str, json_path: str | None, repeats: int, batches=(1, 16, 64)) -> int:
    import torch

    import qpipe.ir.ops  # noqa: F401  (registers the qpipe:: ops the program calls)
    from qpipe.backends import open_folder

    meta = json.load(open(os.path.join(prep_dir, "prepared.json")))
    ep = torch.export.load(os.path.join(prep_dir, "float.pt2"))
    cast_weights(ep, torch.float32)  # fp16-stored weights (prepare --half-weights) back
    float_cpu = ep.module()
    int_dir = os.path.join(prep_dir, "int8")
    if os.path.isdir(int_dir):
        int_cpu = open_folder(int_dir).runner.module  # a reference folder: the torch.export program
        quantized_where = "prepare"
    else:  # too big to carry both: run the default pipeline here, on the float program
        import qpipe.api as qp
        t0 = time.perf_counter()
        fm = qp.load_model(ep, (torch.randn(1, meta["feat_in"], 256),))
        int_cpu = qp.quantize(fm, passes="default").gm
        quantized_where = f"run ({time.perf_counter() - t0:.1f} s)"
        print(f"quantized on this machine in {quantized_where}", flush=True)
    float_gpu = _moved(float_cpu, DEVICE)
    int_gpu = _moved(int_cpu, DEVICE)
    float_gpu_half = _moved(float_cpu, DEVICE, half=True)
    def cpu_sync():
        return None

    cuda_sync = torch.cuda.synchronize if DEVICE == "cuda" else cpu_sync

    rows = []
    shapes = [(b, 1000) for b in batches]  # 10 s utterances at 10 ms frames
    with torch.inference_mode():
        for b, t in shapes:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(b, meta["feat_in"], t, generator=g)
            xg = x.to(DEVICE)
            q_cpu = int_cpu(x)
            q_gpu = int_gpu(xg)
            identical = bool(torch.equal(q_cpu, q_gpu.cpu()))
            row = {"batch": b, "frames": t, "int_logits_cuda_equal_cpu": identical,
                   "float32_cuda": _time(float_gpu, xg, cuda_sync, repeats),
                   "float16_cuda": _time(float_gpu_half, xg.half(), cuda_sync, repeats),
                   "integer_reference_cuda": _time(int_gpu, xg, cuda_sync, repeats)}
            if b == 1:
                row["float32_cpu"] = _time(float_cpu, x, cpu_sync, max(3, repeats // 10))
                row["integer_reference_cpu"] = _time(int_cpu, x, cpu_sync, max(3, repeats // 10))
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"model": meta["source"], "prepared_with_torch": meta["torch"],
              "float_weights_stored": meta.get("float_weights_stored", "fp32"),
              "quantized_in": quantized_where,
              "torch": torch.__version__, "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE,
              "cpu_threads": torch.get_num_threads(), "host": platform.node(), "rows": rows}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    print(f"{'batch':>5} {'fp32 CUDA':>10} {'fp16 CUDA':>10} {'int ref CUDA':>13} {'bit-equal':>9}")
    for r in rows:
        print(f"{r['batch']:>5} {r['float32_cuda']['median_ms']:>8.2f}ms {r['float16_cuda']['median_ms']:>8.2f}ms "
              f"{r['integer_reference_cuda']['median_ms']:>11.2f}ms {str(r['int_logits_cuda_equal_cpu']):>9}")
    return 0 if all(r["int_logits_cuda_equal_cpu"] for r in rows) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="float and integer programs of a .nemo (needs NeMo)")
    p.add_argument("nemo")
    p.add_argument("out_dir")
    p.add_argument("--half-weights", action="store_true",
                   help="store the float program's weights in fp16 (a smaller file to carry)")
    r = sub.add_parser("run", help="time them on the GPU")
    r.add_argument("prep_dir")
    r.add_argument("--json")
    r.add_argument("--repeats", type=int, default=50)
    r.add_argument("--batches", default="1,16,64", help="batch sizes, 10 s utterances each")
    a = ap.parse_args()
    if a.cmd == "prepare":
        return prepare(a.nemo, a.out_dir, a.half_weights)
    return run(a.prep_dir, a.json, a.repeats, tuple(int(b) for b in a.batches.split(",")))


if __name__ == "__main__":
    sys.exit(main())
