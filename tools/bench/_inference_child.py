"""One candidate of ``tools/bench/inference.py``, timed in a process of its own.

    python tools/bench/_inference_child.py '{"kind": "ort", "path": "m.onnx", "features": "x.npy", ...}'

kinds: ``torch`` (a ``torch.export`` program, ``.pt2``, run eagerly), ``ort`` (an ONNX
model in ONNX Runtime's CPU provider), ``qpipe`` (a qpipe output folder of any
target: ``open_folder(folder).runner.logits_int``). Prints one line ``RESULT {json}``:
the load time, every timed call in ms, and the process's RSS high-water mark
(the kernel's VmHWM) after the imports and at the end. Every kind imports the same
libraries (numpy, torch, onnxruntime, qpipe's targets) before the first reading, so
the high-water marks compare across kinds and ``peak - imports`` is what the model
and its runs added.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _rss_mb() -> float:
    """This process's RSS high-water mark in MiB: the kernel's VmHWM.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries that across ``exec``, so a
    child started by a big parent would report the parent's high-water mark.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # elsewhere: KiB on Linux, bytes on macOS


def _no_spin(ort) -> None:
    """Every ONNX Runtime session of this process, ours or a qpipe runner's, without spin-waiting
    intra-op threads (``session.intra_op.allow_spinning=0``); torch's side is OMP_WAIT_POLICY=PASSIVE,
    set by the parent. On a machine with more busy threads than cores, spinning threads burn the
    time slices the working ones need."""
    session_cls = ort.InferenceSession

    def inference_session(path, sess_options=None, *args, **kwargs):
        opts = sess_options if sess_options is not None else ort.SessionOptions()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return session_cls(path, opts, *args, **kwargs)

    ort.InferenceSession = inference_session


def main(spec: dict) -> dict:
    threads = int(spec["threads"])
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    try:
        import onnxruntime as ort
    except ImportError:  # a torch-only candidate still runs
        ort = None
    if ort is not None and spec.get("no_spin"):
        _no_spin(ort)
    from qpipe.backends import list_targets, open_folder

    list_targets()  # every target module imported, whichever this process runs
    x_np = np.load(spec["features"])
    rss_imports = _rss_mb()

    started = time.perf_counter()
    kind = spec["kind"]
    if kind == "torch":
        import qpipe.ir.ops  # noqa: F401  (harmless for a float program; a qpipe program needs it)

        module = torch.export.load(spec["path"]).module()
        x = torch.from_numpy(x_np)

        def call():
            with torch.inference_mode():
                return module(x)
    elif kind == "ort":
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(spec["path"], sess_options=opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x_np}

        def call():
            return sess.run(None, feed)[0]
    elif kind == "qpipe":
        os.environ.setdefault("QPIPE_ORT_THREADS", str(threads))
        runner = open_folder(spec["path"]).runner
        x = torch.from_numpy(x_np)

        def call():
            with torch.inference_mode():
                return runner.logits_int(x)
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    out = call()  # the first call belongs to loading (lazy init, first allocations)
    load_s = time.perf_counter() - started
    for _ in range(int(spec.get("warmup", 1))):
        call()
    times = []
    budget = float(spec.get("max_seconds", 30.0))
    t_all = time.perf_counter()
    for i in range(int(spec.get("repeat", 3))):
        t = time.perf_counter()
        call()
        times.append(1e3 * (time.perf_counter() - t))
        if time.perf_counter() - t_all > budget:
            break
    shape = list(out.shape)
    dtype = str(out.dtype).replace("torch.", "")
    return {"load_s": round(load_s, 3), "times_ms": [round(t, 3) for t in times], "output_shape": shape,
            "output_dtype": dtype, "rss_imports_mb": round(rss_imports, 1), "rss_peak_mb": round(_rss_mb(), 1),
            "threads": threads, "torch_threads": torch.get_num_threads()}


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(result), flush=True)
