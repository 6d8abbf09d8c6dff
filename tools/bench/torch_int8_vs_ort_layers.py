"""One layer of each QuartzNet kind, torch-int8 against ONNX Runtime's own QLinearConv, per layer.

    .venv/bin/python tools/bench/torch_int8_vs_ort_layers.py [--batch 1] [--threads 2] [--channels 192] [--frames 401]

Each runtime runs a chain of ``--layers`` identical uint8 layers (a pointwise conv, then a depthwise k=31
one), so that per-call overheads and the input transposes spread over the chain as they do in a model.
ORT gets a QLinearConv graph (its CPU provider turns it into NHWC ``com.microsoft.QLinearConv``); torch-int8
runs the program's ``Conv`` kernel on channels-last codes. The integers are not compared (the layers are
random and ORT rounds its own way); what this shows is where a kernel stands against ORT's on one shape.
Each runtime runs in a process of its own every round (``--only``), the order rotated; the figure is the
median over rounds of each round's median. (In one process the idle threads of ORT's pool and of torch's
OpenMP pool spin while the other runtime works, on a 2-core machine each slowing the other.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import numpy as np
import torch
from _kernel_timing import median_us


def _ort_chain(kind: str, w: np.ndarray, batch: int, channels: int, frames: int, layers: int, threads: int):
    import onnx.helper as h
    import onnxruntime as ort
    from onnx import TensorProto, numpy_helper

    k = w.shape[2]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
             numpy_helper.from_array(np.array(128, np.uint8), "xz"),
             numpy_helper.from_array(np.full((channels,), 0.001, np.float32), "ws"),
             numpy_helper.from_array(np.zeros((channels,), np.int8), "wz"),
             numpy_helper.from_array(np.zeros((channels,), np.int32), "b")]
    nodes, cur = [], "x"
    for i in range(layers):
        nodes.append(h.make_node("QLinearConv", [cur, "xs", "xz", "w", "ws", "wz", "xs", "xz", "b"], [f"y{i}"],
                                 group=channels if kind == "dw" else 1, kernel_shape=[k], pads=[k // 2, k // 2]))
        cur = f"y{i}"
    shape = [batch, channels, frames]
    graph = h.make_graph(nodes, kind, [h.make_tensor_value_info("x", TensorProto.UINT8, shape)],
                         [h.make_tensor_value_info(cur, TensorProto.UINT8, shape)], inits)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


RUNTIMES = ("ort", "torch")


def _time_one(a: argparse.Namespace) -> dict[str, float]:
    """``--only`` a runtime, in this process: kind -> microseconds per layer (median of one round)."""
    torch.set_num_threads(a.threads)
    from qpipe.backends._torch_int8 import cpu, cpu_ext
    from qpipe.ir.ops.kernels import f32_multiplier

    ext = cpu_ext.get()
    if ext is None:
        raise SystemExit(f"torch_int8_vs_ort_layers: the C++ kernels did not build here ({cpu_ext.why_not()})")
    rng = np.random.default_rng(0)
    m, s = f32_multiplier(0.001)
    out: dict[str, float] = {}
    for kind, k in (("pw", 1), ("dw", 31)):
        c = a.channels
        w = rng.integers(-127, 128, (c, 1 if kind == "dw" else c, k)).astype(np.int8)
        x = rng.integers(0, 256, (a.batch, c, a.frames)).astype(np.uint8)
        if a.only == "ort":
            sess = _ort_chain(kind, w, a.batch, c, a.frames, a.layers, a.threads)
            fn = lambda: sess.run(None, {"x": x})  # noqa: E731
            label = "ORT QLinearConv"
        else:
            conv = cpu.Conv(ext, dict(w=torch.from_numpy(w), bias=None, stride=[1], padding=[k // 2], dilation=[1],
                                      groups=c if kind == "dw" else 1, m=torch.tensor([m]), s=torch.tensor([s]), lo=0,
                                      hi=255, bits=8, f32=True), 8, fused=True, x_unsigned=True)
            xt = torch.from_numpy(x).transpose(1, 2).contiguous().transpose(1, 2)  # the program's storage

            def fn():
                y = xt
                for _ in range(a.layers):
                    y = conv(y)
                return y
            label = f"torch-int8 {conv.kind}"
        out[f"{kind} k={k:<3d} {label}"] = median_us(fn, a.calls) / a.layers
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels", type=int, default=192)
    ap.add_argument("--frames", type=int, default=401)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--only", choices=RUNTIMES, help="time one runtime, one round, in this process (prints JSON)")
    a = ap.parse_args()
    if a.only:
        print(json.dumps(_time_one(a)))
        return
    base = [sys.executable, __file__, *(f"--{k}={v}" for k, v in vars(a).items() if k not in ("only", "rounds"))]
    per_round: dict[str, list[float]] = {}
    for r in range(a.rounds):
        for rt in RUNTIMES[r % 2:] + RUNTIMES[:r % 2]:
            res = subprocess.run([*base, f"--only={rt}"], capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"{rt} failed")
            for n, us in json.loads(res.stdout.strip().splitlines()[-1]).items():
                per_round.setdefault(n, []).append(us)
    print(f"batch {a.batch}, {a.channels} channels, {a.frames} frames, {a.threads} threads, chains of {a.layers}; "
          f"us per layer (median over {a.rounds} rounds of {a.calls} calls, each runtime in its own process)")
    for n in sorted(per_round):
        print(f"  {n:34s} {statistics.median(per_round[n]):8.1f}")


if __name__ == "__main__":
    main()
