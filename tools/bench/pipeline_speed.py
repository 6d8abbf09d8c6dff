#!/usr/bin/env python3
"""Benchmark: wall time and peak memory of `qpipe MODEL --passes default` on NeMo configs.

Builds each model from NeMo's published config (random weights, non-default BN
statistics), then runs the CLI in a child process per model and reads its peak
RSS from the kernel. Writes a JSON with every number and prints a table.

    python tools/bench/pipeline_speed.py --models quartznet_15x5 jasper_10x5 --json bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["quartznet_15x5"], help="names from qpipe/frontends/nemo_configs.py")
    ap.add_argument("--passes", default="default")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--keep", help="folder to keep the built .nemo files and outputs in")
    args = ap.parse_args()
    from qpipe.frontends.nemo_configs import build_random_nemo

    work = args.keep or tempfile.mkdtemp(prefix="qpipe-bench-")
    os.makedirs(work, exist_ok=True)
    results = []
    for name in args.models:
        nemo = os.path.join(work, f"{name}.nemo")
        if not os.path.exists(nemo):
            print(f"building {name} from its config ...", file=sys.stderr)
            build_random_nemo(name, nemo)
        out = os.path.join(work, f"{name}_int8")
        cmd = [sys.executable, os.path.join(ROOT, "tools", "qpipe"), nemo, "--passes", args.passes, "-o", out, "--force", "--quiet"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_seconds = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        peak_kb = after.ru_maxrss  # max over children so far: run models smallest first
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        meta = json.load(open(os.path.join(out, "qpipe.json")))
        row = {
            "model": name,
            "parameters": meta["model_info"].get("parameters"),
            "wall_seconds": round(seconds, 1),
            "pipeline_seconds": meta["metrics"]["pipeline_seconds"],
            "load_export_seconds": meta["metrics"]["load_seconds"],
            "cpu_seconds": round(cpu_seconds, 1),
            "peak_rss_gb": round(peak_kb / 2**20, 2),
            "float_mb": meta["metrics"]["float_mb"],
            "int_mb": meta["metrics"]["final_mb"],
            "size_ratio": round(meta["metrics"]["float_mb"] / meta["metrics"]["final_mb"], 2),
            "logprob_sqnr_db": meta["metrics"].get("logprob_sqnr_db"),
            "pipeline": meta["pipeline"],
            "per_pass_seconds": {p["name"]: p["seconds"] for p in meta["passes"]},
            "cpu_count": os.cpu_count(),
            "loadavg_1min_after": round(os.getloadavg()[0], 2),
        }
        results.append(row)
        print(
            f"{name:<16} {row['parameters']:>11,} params  wall {row['wall_seconds']:7.1f}s  cpu {row['cpu_seconds']:7.1f}s  "
            f"(load+export {row['load_export_seconds']}s, passes {row['pipeline_seconds']}s)  "
            f"peak RSS {row['peak_rss_gb']} GB  {row['float_mb']} MB -> {row['int_mb']} MB ({row['size_ratio']}x)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
