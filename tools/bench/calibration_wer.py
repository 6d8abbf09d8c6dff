#!/usr/bin/env python3
"""WER of one model quantized with four calibration sources, side by side with the float model.

Sources: synthetic (BN-statistics distillation, the default pipeline: no data), real audio
from a manifest, Gaussian noise, one all-zeros input.  With ``--seeds N`` every seeded
source is quantized N times (different synthetic inputs / real utterances / noise), so
the table shows how much of a WER difference is calibration luck: on a weak model a
handful of words decide a few tenths of a point.

    tools/bench/calibration_wer.py MODEL.nemo EVAL_MANIFEST REAL_AUDIO_MANIFEST \
        [--seeds 3] [--work DIR] [--json OUT.json]

The real-audio manifest must not overlap the evaluation set.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QPIPE = str(ROOT / "tools" / "qpipe")
TAIL = "substitute-int-ops,fuse-requant,eliminate-dead-float"


def calibrations(real_manifest: str, seed: int) -> dict[str, str | None]:
    return {
        "synthetic": f"calibrate-synthetic{{seed={seed}}}",
        "real": f"calibrate-data{{manifest={real_manifest},utterances=32,seed={seed}}}",
        "noise": f"calibrate-noise{{kind=gaussian,seed={seed}}}",
        "zeros": "calibrate-noise{kind=zeros}" if seed == 0 else None,  # nothing to vary
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("eval_manifest")
    ap.add_argument("real_manifest")
    ap.add_argument("--seeds", type=int, default=1, help="calibrations per source (default 1)")
    ap.add_argument("--work", default="/tmp/qpipe-calibration-wer")
    ap.add_argument("--json", default=None, help="write the summary here")
    ap.add_argument("--lm", default=None, help="decode with this word LM (qpipe eval --lm); default greedy")
    ap.add_argument("--skip-quantize", action="store_true",
                    help="reuse the outputs already in --work (e.g. to decode them again with --lm)")
    args = ap.parse_args(argv)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    outs: list[tuple[str, int, Path]] = []
    for seed in range(args.seeds):
        for source, calib in calibrations(args.real_manifest, seed).items():
            if calib is None:
                continue
            out = work / f"{source}_s{seed}"
            outs.append((source, seed, out))
            if args.skip_quantize and (out / "qpipe.json").is_file():
                continue
            t = time.time()
            subprocess.run([QPIPE, args.model, "--passes", f"fold-bn,insert-observers,{calib},{TAIL}",
                            "-o", str(out), "--force", "--quiet"], check=True,
                           stdout=subprocess.DEVNULL)
            print(f"[calibration] {out.name}: {time.time() - t:.0f} s", flush=True)
    eval_json = work / ("eval_lm.json" if args.lm else "eval.json")
    subprocess.run([QPIPE, "eval", args.model, *[str(o) for _, _, o in outs], "--manifest",
                    args.eval_manifest, "--json", str(eval_json), "--quiet",
                    *(["--lm", args.lm] if args.lm else [])], check=True)
    result = json.loads(eval_json.read_text())
    rows = {Path(r["path"]).name: r for r in result["models"]}
    float_row = next(r for r in result["models"] if r["kind"] == "float")

    summary = {"model": args.model, "eval_manifest": args.eval_manifest,
               "real_manifest": args.real_manifest, "utterances": result["utterances"],
               "decoding": result.get("decoding", {"method": "greedy"}),
               "reference_words": float_row["reference_words"], "seeds": args.seeds,
               "float": {"wer": float_row["wer"], "cer": float_row["cer"]}, "sources": {}}
    print(f"\n{result['utterances']} utterances, {float_row['reference_words']} words; "
          f"float WER {float_row['wer']:.2f} CER {float_row['cer']:.2f}")
    print(f"{'source':10s} {'runs':>4s} {'WER mean':>9s} {'min':>7s} {'max':>7s} "
          f"{'dWER mean':>9s} {'CER mean':>9s}")
    for source in ["synthetic", "real", "noise", "zeros"]:
        rs = [rows[o.name] for s, _, o in outs if s == source]
        if not rs:
            continue
        wers = [r["wer"] for r in rs]
        cers = [r["cer"] for r in rs]
        entry = {"runs": len(rs), "wer": wers, "cer": cers,
                 "wer_mean": statistics.fmean(wers), "cer_mean": statistics.fmean(cers),
                 "delta_wer_mean": statistics.fmean(wers) - float_row["wer"]}
        summary["sources"][source] = entry
        print(f"{source:10s} {len(rs):4d} {entry['wer_mean']:9.2f} {min(wers):7.2f} "
              f"{max(wers):7.2f} {entry['delta_wer_mean']:+9.2f} {entry['cer_mean']:9.2f}")
    src = summary["sources"]
    if "synthetic" in src and "real" in src:
        summary["synthetic_minus_real_wer"] = src["synthetic"]["wer_mean"] - src["real"]["wer_mean"]
        print(f"synthetic - real (mean WER): {summary['synthetic_minus_real_wer']:+.2f} points")
    if args.json:
        # per-utterance hypotheses stay in WORK/eval.json; the summary keeps the totals
        totals = {k: v for k, v in result.items() if k != "per_utterance"}
        Path(args.json).write_text(json.dumps({"summary": summary, "eval": totals}, indent=1))
        print(f"wrote {args.json} (per-utterance results: {eval_json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
