#!/usr/bin/env python
"""Time and peak memory of ``qpipe MODEL --passes PIPELINE`` (a benchmark, not a test).

Each model runs in its own child process so that peak RSS (``ru_maxrss`` of the
child, its own high-water mark) belongs to that model alone. A name from
``qpipe.frontends.nemo_configs.CONFIGS`` (``conformer_medium``) is built with random
weights and non-default BatchNorm first (once, cached beside --cache).

    .venv/bin/python tools/bench/pipeline_memory.py models/demo_conformer.nemo conformer_medium
    .venv/bin/python tools/bench/pipeline_memory.py conformer_small --passes default --threads 2

Prints one markdown row per model: export seconds, pipeline seconds (each pass),
peak RSS, float and integer parameter MB, float ops left.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child(model: str, passes: str, out_json: str) -> None:
    sys.path.insert(0, ROOT)
    from qpipe.api import quantize

    started = time.perf_counter()
    result = quantize(model, passes, progress=False)
    total = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    records = [(r.name, round(r.seconds, 2)) for r in result.run.records]
    float_ops = next((r.stats.get("float_ops") for r in result.run.records if r.name == "eliminate-dead-float"), None)
    facts = {
        "model": model, "passes": passes, "total_s": round(total, 1), "peak_rss_mb": round(peak_kb / 1024, 1),
        "passes_s": records, "float_ops": float_ops, **{k: result.metrics.get(k) for k in
                                                        ("load_seconds", "pipeline_seconds", "float_mb", "final_mb",
                                                         "logprob_sqnr_db", "argmax_agreement")},
    }
    with open(out_json, "w") as fh:
        json.dump(facts, fh)


def build(name: str, cache: str) -> str:
    path = os.path.join(cache, f"{name}.nemo")
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        code = (f"import sys; sys.path.insert(0, {ROOT!r}); from qpipe.frontends.nemo_configs import build_random_nemo; "
                f"build_random_nemo({name!r}, {path!r}, seed=0)")
        subprocess.run([sys.executable, "-c", code], check=True)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", help=".nemo files or nemo_configs names")
    p.add_argument("--passes", default="default")
    p.add_argument("--threads", type=int, default=1, help="torch/OMP threads in each child")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/qpipe-bench"))
    p.add_argument("--json", help="also write every row as JSON")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        child(args.child[0], args.passes, args.child[1])
        return 0
    rows = []
    print("| model | export s | pipeline s | slowest passes (s) | peak RSS MB | float MB | int MB | float ops | SQNR dB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        path = model if model.endswith(".nemo") else build(model, args.cache)
        out = os.path.join(args.cache, f"pipeline_memory_{os.getpid()}.json")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run([sys.executable, os.path.abspath(__file__), "--passes", args.passes, "--threads",
                        str(args.threads), "--child", path, out], check=True, env=env)
        with open(out) as fh:
            r = json.load(fh)
        os.remove(out)
        rows.append(r)
        slow = ", ".join(f"{n} {s}" for n, s in sorted(r["passes_s"], key=lambda x: -x[1])[:3])
        print(f"| {model} | {r['load_seconds']} | {r['pipeline_seconds']} | {slow} | {r['peak_rss_mb']} | "
              f"{r['float_mb']} | {r['final_mb']} | {r['float_ops']} | {r['logprob_sqnr_db']} |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
