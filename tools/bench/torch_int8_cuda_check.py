"""torch-int8 on CUDA: bit-exact with the CPU reference, and timed against torch fp32/fp16 at batch 8.

    .venv/bin/python tools/bench/torch_int8_cuda_check.py [--models demo,quartznet_15x5] [--batch 8]
        [--frames 1601] [--rounds 10] [--work /tmp/qpipe_ti8_bench]

Uses the same cached models and folders as tools/bench/torch_int8_models.py
(made on first use; needs NeMo). On a machine without CUDA it says so in one line and exits 2.
Prints, per model: the kernels the CUDA program chose, whether its logits equal
the CPU reference program's at batch 1 and --batch, and median ms (CUDA-synchronized)
of the float graph in fp32 and fp16 and of torch-int8, with the ratios.

A GPU machine without NeMo (or with another torch) runs it from a kit made here:

    .venv/bin/python tools/bench/torch_int8_cuda_check.py --make-kit gpu_kit     # here: plans, inputs, reference logits
    python tools/bench/torch_int8_cuda_check.py --kit gpu_kit --json $OUT/cuda.json  # there (carry gpu_kit)

The kit holds each model's torch-int8 plan (plain tensors), the seeded inputs at batch 1
and --batch, and the CPU reference's integer logits for them. There the float baseline
is the plan's float twin (``float_twin``): the same convolutions (BatchNorm folded), ReLUs
and residual adds in float, with random weights of the same shapes; speed does not depend
on the values. ``--kit DIR --device cpu`` runs the same check on CPU tensors with the CUDA
kernels (Triton interpreted: slow, for a kit made with small --frames).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def timed(fn, x, rounds: int, sync=None) -> float:
    sync = sync or torch.cuda.synchronize
    for _ in range(3):
        fn(x)
    sync()
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn(x)
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def float_twin(plan: dict):
    """The plan's network in float: its convolutions (BatchNorm folded), ReLUs (an op clamped at 0) and residual
    adds, random weights of the same shapes. A float model like the one the plan came from, as far as speed goes."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    layers = []
    for st in plan["steps"]:
        fn, a = st["fn"], st["args"]
        if fn == "qpipe.conv1d_rq":
            shape = plan["tensors"][a["w"]["tensor"]].shape
            w = torch.randn(shape, generator=g) / (shape[1] * shape[2]) ** 0.5
            layers.append(("conv", st["out"], a["x"]["ref"], torch.nn.Parameter(w, requires_grad=False),
                           dict(stride=a["stride"], padding=a["padding"], dilation=a["dilation"], groups=a["groups"]),
                           int(a["lo"]) == 0))
        elif fn == "qpipe.add_requant":
            layers.append(("add", st["out"], (a["a"]["ref"], a["b"]["ref"]), None, None, int(a["lo"]) == 0))
        elif fn == "qpipe.quantize":
            layers.append(("input", st["out"], a["x"]["ref"], None, None, False))
        elif fn == "aten.transpose.int":
            layers.append(("transpose", st["out"], a[0]["ref"], None, tuple(a[1:]), False))
        else:
            raise SystemExit(f"float_twin: no float form for {fn}")
    out_name = plan["output"][0]["ref"]

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ws = torch.nn.ParameterList([w for _, _, _, w, _, _ in layers if w is not None])

        def forward(self, x):
            env, i = {plan["input"]: x}, 0
            for kind, out, src, w, kw, relu in layers:
                if kind == "conv":
                    y = F.conv1d(env[src], self.ws[i], None, **kw)
                    i += 1
                elif kind == "add":
                    y = env[src[0]] + env[src[1]]
                elif kind == "transpose":
                    y = env[src].transpose(*kw)
                else:
                    y = env[src]
                env[out] = torch.relu(y) if relu else y
            return env[out_name]

    return Twin().eval()


def make_kit(kit: str, models: list[str], batch: int, frames: int, work: str) -> int:
    """Here, with NeMo: each model's plan, seeded inputs and the CPU reference's logits for them."""
    import shutil

    from qpipe.backends import open_folder
    from torch_int8_models import prepare, reference_runner

    os.makedirs(work, exist_ok=True)
    for name in models:
        _, ti8, ref = prepare(name, work)
        mult = int(open_folder(ti8).meta["input"].get("time_multiple", 1) or 1)
        t = (frames // mult) * mult
        d = os.path.join(kit, name)
        os.makedirs(d, exist_ok=True)
        shutil.copy(os.path.join(ti8, "model.ti8.pt"), os.path.join(d, "model.ti8.pt"))
        runner = reference_runner(ref)
        for b in sorted({1, batch}):
            x = torch.randn(b, 64, t, generator=torch.Generator().manual_seed(b))
            torch.save({"x": x, "want": runner.logits_int(x)}, os.path.join(d, f"batch{b}.pt"))
        print(f"kit: {d} ({t} frames, batches {sorted({1, batch})})", flush=True)
    return 0


def _float_candidates(plan: dict, dev: torch.device, cuda: bool) -> dict:
    """The float baselines: the twin in fp32 (strict, and with TF32, torch's default for cuDNN convolutions), in fp16,
    and on CUDA each of them replayed from a CUDA graph too (the launch cost the int8 graph saves, saved for float)."""
    from qpipe.backends._torch_int8.cuda_graph import CudaGraphed

    twin = float_twin(plan).to(dev)
    out = {"torch fp32 (float twin)": (twin, torch.float32, False)}
    if cuda:
        out["torch fp32+TF32 (float twin)"] = (twin, torch.float32, True)
        twin16 = float_twin(plan).to(dev).half()
        out["torch fp16 (float twin)"] = (twin16, torch.float16, False)
        out["torch fp32 CUDA graph (float twin)"] = (CudaGraphed(twin, dev), torch.float32, False)
        out["torch fp16 CUDA graph (float twin)"] = (CudaGraphed(twin16, dev), torch.float16, False)
    return out


def _time_candidates(row: dict, cands: dict, batch_file: str, dev, cuda: bool, rounds: int, sync, save,
                     key: str) -> dict:
    """Median ms of every candidate (name -> (callable, input dtype or None, TF32 on)) on one batch, into
    ``row[key]`` as each one is done."""
    import traceback

    x = torch.load(batch_file, weights_only=True)["x"].to(dev)
    res: dict = {}
    for cname, (fn, dtype, tf32) in cands.items():
        try:
            xin = x.to(dtype) if dtype is not None else x
            if cuda:
                torch.backends.cudnn.allow_tf32 = tf32
                torch.backends.cuda.matmul.allow_tf32 = tf32
            with torch.no_grad():
                res[cname] = timed(fn, xin, rounds, sync)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            row["errors"][f"time {key} {cname}"] = f"{type(exc).__name__}: {exc}"[:300]
        if hasattr(fn, "mode"):  # a CudaGraphed: whether it replayed a graph, or why it ran eagerly
            row.setdefault("graph_modes", {})[cname] = fn.mode
        row[key] = {k: round(v, 4) for k, v in res.items()}
        save()
    return res


def run_kit(kit: str, device: str, rounds: int, json_path: str | None) -> int:
    """There: the CUDA kernels (eager, and replayed from CUDA graphs) against the kit's reference logits, and the
    float twin in fp32 / fp16 against them. Every result is written to ``json_path`` as soon as it exists, and a
    failing candidate is recorded as such, so that one short run on a lent GPU keeps all it measured."""
    import json
    import traceback

    from qpipe.backends._torch_int8.cuda_graph import CudaGraphed
    from qpipe.backends._torch_int8.program import Program

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("torch_int8_cuda_check: no CUDA device here (torch.cuda.is_available() is False)")
        return 2
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name_dev = torch.cuda.get_device_name(dev) if cuda else "cpu (CUDA kernels, Triton interpreted)"
    print(f"torch {torch.__version__}, {name_dev}", flush=True)
    report: dict = {"torch": torch.__version__, "device": name_dev, "models": {}}
    try:
        import triton

        report["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        report["triton"] = None

    def save() -> None:
        if json_path:
            with open(json_path, "w") as f:
                json.dump(report, f, indent=1)

    all_exact = True
    for name in sorted(os.listdir(kit)):
        d = os.path.join(kit, name)
        plan = torch.load(os.path.join(d, "model.ti8.pt"), weights_only=True)
        prog = Program(plan, dev, kernels="cuda")
        programs = {"qpipe torch-int8 CUDA eager": prog}
        if cuda:
            programs["qpipe torch-int8 CUDA graph"] = CudaGraphed(prog)
        kinds: dict[str, int] = {}
        for k in prog.kernels.values():
            kinds[k] = kinds.get(k, 0) + 1
        row: dict = {"kernels": kinds, "bit_exact": {}, "median_ms": {}, "errors": {}}
        report["models"][name] = row
        print(f"{name}: kernels {kinds}", flush=True)
        batches = sorted(int(f[5:-3]) for f in os.listdir(d) if f.startswith("batch"))
        for b in batches:
            data = torch.load(os.path.join(d, f"batch{b}.pt"), weights_only=True)
            want = data["want"]
            for pname, p in programs.items():
                key = f"{b}" if pname.endswith("eager") else f"{b} graph"
                try:
                    for _ in range(2):  # a graph's eager first call and its capture: the check below is of a replay
                        p(torch.zeros_like(data["x"]))
                    got = p(data["x"]).cpu()
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    row["errors"][key] = f"{type(exc).__name__}: {exc}"[:300]
                    row["bit_exact"][key], all_exact = False, False
                    continue
                same = got.dtype == want.dtype and torch.equal(got, want)
                all_exact &= same
                row["bit_exact"][key] = same
                diff = "" if same else f" (max |diff| {int((got.to(torch.int64) - want.to(torch.int64)).abs().max())})"
                print(f"  batch {b}, {pname}: logits bit-exact with the CPU reference: {same}{diff}", flush=True)
            save()
        cands = _float_candidates(plan, dev, cuda)  # built once: the graphed ones keep a graph per batch shape
        cands.update({k: (v, None, False) for k, v in programs.items()})
        for b in [batches[-1]] + ([1] if cuda and len(batches) > 1 and 1 in batches else []):
            res = _time_candidates(row, cands, os.path.join(d, f"batch{b}.pt"), dev, cuda, rounds, sync, save,
                                   "median_ms" if b == batches[-1] else f"median_ms_batch{b}")
            base = res.get("torch fp32 (float twin)")
            if b == batches[-1]:
                row["batch"] = b
                for k in ("qpipe torch-int8 CUDA eager", "qpipe torch-int8 CUDA graph"):
                    if base and k in res:
                        row[f"speedup vs fp32: {k}"] = round(base / res[k], 3)
                fp32g, i8g = res.get("torch fp32 CUDA graph (float twin)"), res.get("qpipe torch-int8 CUDA graph")
                if fp32g and i8g:
                    row["speedup graph vs fp32 graph"] = round(fp32g / i8g, 3)
            save()
            if base:
                print(f"  batch {b}: " + ", ".join(f"{k} {v:.3f} ms (x{base / v:.2f})" for k, v in res.items()), flush=True)
    report["bit_exact_everywhere"] = all_exact
    save()
    print("bit-exact on every model and batch:", all_exact)
    return 0 if all_exact else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,quartznet_15x5")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=1601)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--work", default="/tmp/qpipe_ti8_bench")
    ap.add_argument("--make-kit", metavar="DIR", help="write a kit for a GPU machine without NeMo (needs NeMo here)")
    ap.add_argument("--kit", metavar="DIR", help="run from a kit (--make-kit); no NeMo, no torch.export files")
    ap.add_argument("--device", default="cuda", help="with --kit: cuda, or cpu (the CUDA kernels on CPU tensors)")
    ap.add_argument("--json", help="with --kit: write the numbers here")
    a = ap.parse_args()
    if a.make_kit:
        return make_kit(a.make_kit, a.models.split(","), a.batch, a.frames, a.work)
    if a.kit:
        if a.device == "cpu" and not os.environ.get("TRITON_INTERPRET"):
            os.environ["TRITON_INTERPRET"] = "1"  # before qpipe's CUDA kernels are defined
        return run_kit(a.kit, a.device, a.rounds, a.json)
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
