#!/usr/bin/env python3
"""Benchmark: inference latency of qpipe's targets against the float model and ONNX Runtime's own int8.

One run, the same input for every candidate (16 s of held-out audio through the
model's featurizer, 1601 frames; batch 1 and 8; 2 intra-op threads), each
candidate timed in a process of its own, the order rotated every round, several
rounds; the median of every timed call. Candidates:

    torch-fp32   the float graph (torch.export of the NeMo encoder+decoder), run eagerly
    ort-fp32     the float model as ONNX in ONNX Runtime
    ort-int8     onnxruntime.quantization.quantize_static QDQ, int8 activations   } per-channel int8 weights,
    ort-uint8    the same with uint8 activations                                  } MinMax on held-out features
    NAME         any qpipe target (reference, onnx-qdq, torch-int8, ...): quantized once into the cache,
                 timed as open_folder(folder).runner.logits_int(features); one line and skipped when
                 the target is not registered or not available here

Ratios are time / baseline time (below 1: faster than the baseline). Peak memory is
the candidate process's RSS high-water mark (VmHWM), absolute; every child
imports the same libraries first (numpy, torch, onnxruntime, qpipe's targets), and
the JSON also has the high-water after those imports. Sizes are the model files on
disk (a qpipe folder: its target's files). With checks on (the default) it also
records what ORT fused, onnx-qdq's logits against the reference's, and WER/CER on
the held-out set (models with trained weights only).

    python tools/bench/inference.py --models demo quartznet_15x5 --json demo/bench-results/inference-DATE.json
    python tools/bench/inference.py --quick          # a smoke test on a toy torch model (no NeMo)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

BASELINES = {  # name -> (label, child kind)
    "torch-fp32": ("torch fp32", "torch"),
    "ort-fp32": ("ORT fp32", "ort"),
    "ort-int8": ("ORT qdq int8", "ort"),
    "ort-uint8": ("ORT qdq uint8", "ort"),
}
DEFAULT_CANDIDATES = [*BASELINES, "reference", "onnx-qdq", "torch-int8"]
QUICK_PASSES = ("fold-bn,insert-observers,calibrate-synthetic{steps=5,batch=2,length=64,lr=0.05},"
                "substitute-int-ops,fuse-requant,eliminate-dead-float")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def label(cand: str) -> str:
    return BASELINES[cand][0] if cand in BASELINES else f"qpipe {cand}"


def _mb(nbytes: int) -> float:
    return round(nbytes / 2**20, 3)


def candidate_files(cand: str, art) -> Optional[tuple[str, str, list[str]]]:
    """(child kind, path, model files on disk) of a candidate for one model; None: not built (skipped)."""
    if cand == "torch-fp32":
        return "torch", art.float_pt2, [art.float_pt2]
    if cand == "ort-fp32":
        return "ort", art.float_onnx, [art.float_onnx]
    if cand in ("ort-int8", "ort-uint8"):
        path = art.ort.get(cand.split("-")[1])
        return ("ort", path, [path]) if path else None
    folder = art.qpipe.get(cand)
    if not folder:
        return None
    from qpipe.backends import get_target

    return "qpipe", folder, [os.path.join(folder, f) for f in get_target(cand).files]


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    t = str(spec["threads"])
    env.update(OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, QPIPE_ORT_THREADS=t, PYTHONPATH=ROOT)
    if spec.get("no_spin"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_inference_child.py"), json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def time_model(art, cands: list[str], batches: list[int], args) -> list[dict[str, Any]]:
    """Every (batch, candidate) of one model: rounds x (one process per candidate, order rotated)."""
    present = []
    for c in cands:
        files = candidate_files(c, art)
        if files is None:
            continue
        present.append((c, files))
    rows: list[dict[str, Any]] = []
    if not present:
        return rows
    all_present, seen = present, {}  # seen: candidate -> (batch, median ms) at the last batch it ran
    for b in sorted(batches):
        present = []
        for c, files in all_present:
            if args.skip_slow and c in seen:
                pb, pm = seen[c]
                expect_s = pm * b / pb / 1e3
                if expect_s > args.skip_slow:
                    log(f"[{art.spec.name} b{b}] skipping {label(c)}: about {expect_s:.0f} s a call "
                        f"({pm:.0f} ms at batch {pb}) is past --skip-slow {args.skip_slow:g} s")
                    rows.append({"model": art.spec.name, "batch": b, "frames": art.frames, "candidate": c,
                                 "label": label(c), "path": files[1], "size_mb": _mb(sum(
                                     os.path.getsize(f) for f in files[2] if os.path.isfile(f))),
                                 "skipped": f"expected {expect_s:.0f} s per call > --skip-slow {args.skip_slow:g} s"})
                    continue
            present.append((c, files))
        if not present:
            continue
        samples: dict[str, list[float]] = {c: [] for c, _ in present}
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c, _ in present}
        for r in range(args.rounds):
            k = r % len(present)
            order = present[k:] + present[:k]
            for c, (kind, path, _) in order:
                spec = {"kind": kind, "path": path, "features": art.features[b], "threads": args.threads,
                        "warmup": args.warmup, "repeat": args.repeat, "max_seconds": args.max_seconds,
                        "no_spin": args.no_spin}
                res = run_child(spec, args.child_timeout)
                runs[c].append(res)
                if "error" in res:
                    log(f"[{art.spec.name} b{b} round {r + 1}/{args.rounds}] {label(c)}: FAILED {res['error']}")
                    continue
                samples[c].extend(res["times_ms"])
                log(f"[{art.spec.name} b{b} round {r + 1}/{args.rounds}] {label(c):<18} "
                    f"median {statistics.median(res['times_ms']):9.2f} ms ({len(res['times_ms'])} calls, "
                    f"load {res['load_s']:.1f} s, peak {res['rss_peak_mb']:.0f} MB)")
        for c, (kind, path, files) in present:
            ok = [x for x in runs[c] if "error" not in x]
            row: dict[str, Any] = {"model": art.spec.name, "batch": b, "frames": art.frames, "candidate": c,
                                   "label": label(c), "path": path}
            if not samples[c]:
                row["error"] = runs[c][0].get("error") if runs[c] else "not run"
            else:
                row.update({
                    "median_ms": round(statistics.median(samples[c]), 3),
                    "min_ms": round(min(samples[c]), 3),
                    "max_ms": round(max(samples[c]), 3),
                    "calls": len(samples[c]),
                    "round_medians_ms": [round(statistics.median(x["times_ms"]), 3) for x in ok],
                    "load_s_median": round(statistics.median(x["load_s"] for x in ok), 3),
                    "peak_rss_mb": max(x["rss_peak_mb"] for x in ok),
                    "rss_after_imports_mb": round(statistics.median(x["rss_imports_mb"] for x in ok), 1),
                    "output_shape": ok[0]["output_shape"], "output_dtype": ok[0]["output_dtype"],
                })
                row["peak_over_imports_mb"] = round(row["peak_rss_mb"] - row["rss_after_imports_mb"], 1)
                seen[c] = (b, row["median_ms"])
            row["size_mb"] = _mb(sum(os.path.getsize(f) for f in files if os.path.isfile(f)))
            row["files"] = [os.path.relpath(f, art.dir) if f.startswith(art.dir) else f for f in files]
            rows.append(row)
    order = {c: i for i, c in enumerate(cands)}
    rows.sort(key=lambda r: (r["batch"], order.get(r["candidate"], 99)))
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """time / baseline time for every baseline that ran, per (model, batch); size / float ONNX size."""
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["batch"]), {})[r["candidate"]] = r
    for group in by.values():
        float_size = group.get("ort-fp32", {}).get("size_mb")
        for r in group.values():
            r["ratio_vs"] = {}
            for base in BASELINES:
                bm = group.get(base, {}).get("median_ms")
                if bm and r.get("median_ms"):
                    r["ratio_vs"][base] = round(r["median_ms"] / bm, 4)
            if float_size:
                r["size_vs_float_onnx"] = round(r["size_mb"] / float_size, 4)


def _fmt(x: Optional[float], spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | batch | candidate | median ms | time / torch fp32 | time / ORT uint8 | size MB | peak MB |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        rv = r.get("ratio_vs", {})
        ms = _fmt(r.get("median_ms"), ".2f") if "skipped" not in r else "skipped (slow)"
        lines.append(f"| {r['model']} | {r['batch']} | {r['label']} | {ms} | "
                     f"{_fmt(rv.get('torch-fp32'), '.3f')} | {_fmt(rv.get('ort-uint8'), '.3f')} | "
                     f"{r['size_mb']:.2f} | {_fmt(r.get('peak_rss_mb'), '.0f')} |")
    return "\n".join(lines)


def run_checks(art, rows: list[dict[str, Any]], args) -> dict[str, Any]:
    import numpy as np

    import _inference_checks as checks

    name = art.spec.name
    out: dict[str, Any] = {}
    onnx = {"ort-int8": art.ort.get("int8"), "ort-uint8": art.ort.get("uint8")}
    if "onnx-qdq" in art.qpipe:
        onnx["onnx-qdq"] = os.path.join(art.qpipe["onnx-qdq"], "model.onnx")
    onnx = {k: v for k, v in onnx.items() if v and os.path.isfile(v)}
    if onnx:
        log(f"[{name}] what ORT's optimizer made of the QDQ models ...")
        out["ort_graphs"] = checks.ort_graphs(onnx, args.threads)
    ratios = {r["batch"]: r.get("ratio_vs", {}).get("ort-uint8") for r in rows
              if r["model"] == name and r["candidate"] == "onnx-qdq"}
    if ratios:
        out["onnx_qdq_vs_ort_uint8"] = {str(b): v for b, v in ratios.items() if v is not None}
    slow = [b for b, v in ratios.items() if v is not None and v > 1.0]
    if (slow or args.profile) and "onnx-qdq" in onnx and "ort-uint8" in onnx:
        b = slow[0] if slow else min(art.features)
        log(f"[{name}] profiling onnx-qdq and ORT uint8 at batch {b} ...")
        x = np.load(art.features[b])
        out["ort_profiles"] = {"batch": b, **checks.ort_profiles(
            {k: onnx[k] for k in ("onnx-qdq", "ort-uint8")}, x, args.threads)}
    if "reference" in art.qpipe:
        for other in [t for t in art.qpipe if t != "reference"]:
            log(f"[{name}] {other} integer logits against the reference ...")
            out.setdefault("agreement_vs_reference", {})[other] = checks.agreement(
                art.qpipe["reference"], art.qpipe[other], art.feat_in, art.frames, args.threads,
                heldout=not args.quick, limit=args.agree_limit, random_batch=args.agree_batch, progress=log)
    if art.spec.random_weights or not art.has_vocabulary or args.quick:
        out["wer"] = "skipped: random weights (a WER of noise says nothing)" if art.spec.random_weights else "skipped"
    else:
        log(f"[{name}] WER/CER on the held-out set ...")
        models = {"ort-fp32": art.float_onnx, **{k: v for k, v in onnx.items() if k.startswith("ort-")}}
        folders = {t: f for t, f in art.qpipe.items()}
        out["wer"] = checks.wer(models, folders, args.threads, args.eval_limit, log)
        out["wer"]["note"] = (f"ORT's quantize_static models were calibrated on the first {args.calib} utterances "
                              "of this same set (qpipe's on synthetic data only)")
    return out


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import onnxruntime
        import torch

        info.update(torch=torch.__version__, onnxruntime=onnxruntime.__version__)
    except ImportError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                                            text=True).stdout.strip()
    except OSError:
        pass
    return info


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--models", nargs="+", default=["demo", "quartznet_15x5"],
                    help="demo, a .nemo path, a qpipe/frontends/nemo_configs.py name (random weights), or torch_tiny")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--seconds", type=float, default=16.0, help="audio per utterance (16 s = 1601 frames)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per process (after the first, counted as loading)")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per process (fewer past --max-seconds)")
    ap.add_argument("--max-seconds", type=float, default=20.0, help="stop a process's timed calls after this many seconds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-slow", type=float, metavar="S",
                    help="skip a candidate at a larger batch when its time at a smaller one scales past S seconds a call")
    ap.add_argument("--candidates", nargs="+", default=DEFAULT_CANDIDATES,
                    help=f"baselines ({', '.join(BASELINES)}) and qpipe target names")
    ap.add_argument("--passes", default="default", help="qpipe pipeline for the targets")
    ap.add_argument("--calib", type=int, default=32, help="held-out utterances that calibrate quantize_static")
    ap.add_argument("--cache", default=os.path.join("~", ".cache", "qpipe-bench"))
    ap.add_argument("--rebuild", action="store_true", help="rebuild every cached file")
    ap.add_argument("--reuse-stale", action="store_true",
                    help="keep cached qpipe folders written by older qpipe sources (default: quantize again)")
    ap.add_argument("--prepare-only", action="store_true", help="build the cache (models, ORT baselines, qpipe folders), time nothing")
    ap.add_argument("--no-spin", action="store_true",
                    help="idle threads sleep instead of spinning, in every candidate: OMP_WAIT_POLICY=PASSIVE (torch) and "
                         "ORT's session.intra_op.allow_spinning=0 (all sessions); for a machine with more busy threads than cores")
    ap.add_argument("--no-checks", dest="checks", action="store_false", help="latency only")
    ap.add_argument("--profile", action="store_true", help="profile ORT even when onnx-qdq is not slower")
    ap.add_argument("--eval-limit", type=int, help="held-out utterances for the WER check (default all)")
    ap.add_argument("--agree-limit", type=int, help="held-out utterances for the onnx-qdq vs reference check (default all)")
    ap.add_argument("--agree-batch", type=int, default=2, help="random-feature utterances for that check")
    ap.add_argument("--child-timeout", type=float, default=900.0)
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: the toy torch model, batch 1, 2 s, 1 round, fast calibration (unless given)")
    args = ap.parse_args(argv)
    given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
    if args.quick:
        defaults = {"--models": ("models", ["torch_tiny"]), "--batch": ("batch", [1]), "--seconds": ("seconds", 2.0),
                    "--rounds": ("rounds", 1), "--warmup": ("warmup", 1), "--repeat": ("repeat", 2),
                    "--passes": ("passes", QUICK_PASSES), "--calib": ("calib", 4)}
        for opt, (dest, value) in defaults.items():
            if opt not in given:
                setattr(args, dest, value)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.no_spin:  # the checks in this process, too (before torch is imported)
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import torch

    torch.set_num_threads(args.threads)
    from _inference_prepare import Preparer, resolve_model

    from qpipe.ir.errors import QpipeError

    started = time.time()
    try:
        specs = [resolve_model(m) for m in args.models]
    except QpipeError as exc:
        print(f"inference.py: error: {exc}", file=sys.stderr)
        return 2
    targets = [c for c in args.candidates if c not in BASELINES]
    need_ort = any(c in ("ort-int8", "ort-uint8") for c in args.candidates) or args.checks
    result: dict[str, Any] = {"command": " ".join([os.path.relpath(__file__, ROOT), *(argv if argv is not None else sys.argv[1:])]),
                              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
                              "settings": {k: getattr(args, k) for k in ("batch", "seconds", "rounds", "warmup", "repeat",
                                                                          "max_seconds", "skip_slow", "threads", "candidates", "passes", "no_spin",
                                                                          "calib", "quick")},
                              "units": {"median_ms": "ms per call (median of every timed call of every round)",
                                        "ratio_vs": "median time / the baseline's median time",
                                        "peak_rss_mb": "the candidate process's RSS high-water mark (VmHWM), absolute",
                                        "size_mb": "model files on disk (MiB)"},
                              "loadavg_start": os.getloadavg(), "rows": [], "skipped": [], "checks": {}}
    for spec in specs:
        prep = Preparer(spec, args.cache, batches=args.batch, seconds=args.seconds, calib=args.calib,
                        passes=args.passes, rebuild=args.rebuild, reuse_stale=args.reuse_stale)
        try:
            art = prep.build(targets, need_ort=need_ort)
        except QpipeError as exc:
            print(f"inference.py: error: {spec.name}: {exc}", file=sys.stderr)
            return 2
        if args.prepare_only:
            log(f"[{spec.name}] prepared in {prep.dir}: {', '.join(sorted(art.qpipe)) or 'no qpipe targets'}")
            continue
        result.setdefault("artifacts", {})[spec.name] = {"dir": art.dir, "frames": art.frames, "feat_in": art.feat_in,
                                                         **art.info}
        result["skipped"] += [{"model": spec.name, "candidate": t} for t in targets if t not in art.qpipe]
        log(f"[{spec.name}] timing {len(args.candidates)} candidates x {len(args.batch)} batch sizes x {args.rounds} rounds "
            f"({art.frames} frames, {args.threads} threads) ...")
        rows = time_model(art, args.candidates, args.batch, args)
        result["rows"] += rows
        if args.checks:
            result["checks"][spec.name] = run_checks(art, rows, args)
    if args.prepare_only:
        return 0
    result["loadavg_end"] = os.getloadavg()
    result["seconds"] = round(time.time() - started, 1)
    table = markdown_table(result["rows"])
    print(table)
    print(f"\n{args.threads} threads; each candidate in its own process, order rotated every round, {args.rounds} rounds; "
          f"time ratios: below 1 is faster; peak MB: the candidate process's RSS high-water (absolute, same imports in all); "
          f"size: model files on disk")
    for s in result["skipped"]:
        print(f"skipped: {s['model']} qpipe {s['candidate']} (see above)")
    for model, c in result["checks"].items():
        for line in check_lines(model, c):
            print(line)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        log(f"wrote {args.json}")
    failed = [r for r in result["rows"] if "error" in r]
    return 1 if failed else 0


def check_lines(model: str, c: dict[str, Any]) -> list[str]:
    lines = []
    for name, g in (c.get("ort_graphs") or {}).items():
        lines.append(f"{model}: ORT runs {name} as {g['optimized']}")
    if c.get("onnx_qdq_vs_ort_uint8"):
        lines.append(f"{model}: onnx-qdq time / ORT uint8 by batch: {c['onnx_qdq_vs_ort_uint8']}")
    for other, a in (c.get("agreement_vs_reference") or {}).items():
        for k, v in a.items():
            lines.append(f"{model}: {other} vs reference, {v['input']}: max |diff| {v['max_abs_diff_steps']} steps, "
                         f"{v['logits_differing']}/{v['logits']} logits differ, same greedy token on "
                         f"{100 * v['share_frames_same_token']:.3f} % of frames")
    w = c.get("wer")
    if isinstance(w, dict):
        for name, r in w["models"].items():
            lines.append(f"{model}: WER {r['wer']:.2f} %  CER {r['cer']:.2f} %  {name} ({w['utterances']} held-out utterances)")
    return lines


if __name__ == "__main__":
    sys.exit(main())
