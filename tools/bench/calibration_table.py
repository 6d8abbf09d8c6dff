#!/usr/bin/env python3
"""One `qpipe eval` table per model: every calibration source, several seeds each.

Sources (each a calibration pass between insert-observers and substitute-int-ops):

    bn        calibrate-synthetic{seed=S}                Q-ASR's BN-statistics matching (the default)
    improved  --improved, default calibrate-synthetic{targets=auto+ctc...}: see IMPROVED
    tts       calibrate-tts{seed=S}                      espeak-ng speech from random words
    real      calibrate-data{manifest=REAL,utterances=N,seed=S}   real audio (must not be the test set)
    noise     calibrate-noise{kind=gaussian,seed=S}

The model is loaded once and quantized in this process (qpipe.api.quantize on the
FloatModel); the outputs are then scored by the `qpipe eval` CLI (its table is
printed as it is), followed by a summary (mean, min, max per source).  With
``--folded DIR`` (an export of tools/fold_bn_export.py) the BN-folded graph is
quantized instead; a source that cannot run on it (bn: no statistics) is reported
with its one-line error.  ``--frames`` adds, per output, the share of the float
model's non-blank frames whose greedy token the quantized model reproduces;
``--ort`` adds ONNX Runtime's quantize_static of the export's model.onnx, calibrated
on the real-audio manifest (MinMax, QDQ, int8 weights per channel and activations).

    tools/bench/calibration_table.py models/demo_quartznet.nemo --eval-manifest data/eval/heldout/manifest.json \\
        --real-manifest REAL.json --seeds 3 [--folded DIR --frames --ort] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

HEAD = "fold-bn,insert-observers"
TAIL = "substitute-int-ops,fuse-requant,eliminate-dead-float"
IMPROVED = "calibrate-synthetic{{targets={targets},seed={seed}}}"
SOURCES = ("bn", "improved", "tts", "real", "noise")


def calibration(source: str, seed: int, args) -> str:
    if source == "bn":
        return f"calibrate-synthetic{{seed={seed}}}"
    if source == "improved":
        return args.improved.format(seed=seed, targets=args.improved_targets)
    if source == "tts":
        return f"calibrate-tts{{seed={seed}}}"
    if source == "real":
        return f"calibrate-data{{manifest={args.real_manifest},utterances={args.real_utterances},seed={seed}}}"
    if source == "noise":
        return f"calibrate-noise{{kind=gaussian,seed={seed}}}"
    raise SystemExit(f"unknown source {source}")


def quantize_all(fm, args, work: Path) -> tuple[list[tuple[str, int, Path]], dict[str, str]]:
    from qpipe.api import quantize
    from qpipe.ir.errors import QpipeError

    outs, errors = [], {}
    for seed in range(args.seeds):
        for source in args.sources:
            out = work / f"{source}_s{seed}"
            passes = f"{HEAD},{calibration(source, seed, args)},{TAIL}"
            if args.skip_quantize and (out / "qpipe.json").is_file():
                outs.append((source, seed, out))
                continue
            t = time.time()
            try:
                quantize(fm, passes, output=str(out), force=True, progress=False, target=args.target)
            except QpipeError as exc:
                errors[source] = str(exc)
                print(f"[calibration] {out.name}: qpipe: error: {exc}", flush=True)
                continue
            outs.append((source, seed, out))
            print(f"[calibration] {out.name}: {time.time() - t:.0f} s  ({passes})", flush=True)
    return outs, errors


def eval_features(fm, manifest: str):
    from qpipe.frontends.audio import read_manifest
    from qpipe.frontends.features import make_featurizer

    featurizer = make_featurizer(fm.preprocessor, fm.featurizer_state)
    entries = read_manifest(manifest)
    return [(e["text"], featurizer.file(e["audio_filepath"])) for e in entries]


def frame_match(float_ids, test_ids, blank: int) -> tuple[int, int]:
    matched = total = 0
    for f, q in zip(float_ids, test_ids):
        n = min(len(f), len(q))  # a target may drop the frames past the model's time multiple
        f, q = f[:n], q[:n]
        keep = f != blank
        total += int(keep.sum())
        matched += int((q[keep] == f[keep]).sum())
    return matched, total


def ort_quantize(onnx_path: Path, work: Path, fm, real_manifest: str, n: int, seed: int) -> Path:
    """quantize_static on real audio: MinMax, QDQ, int8 activations and per-channel int8 weights."""
    import random

    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from qpipe.frontends.audio import read_manifest
    from qpipe.frontends.features import make_featurizer

    pre = work / "ort_pre.onnx"
    if not pre.is_file():
        quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
    entries = read_manifest(real_manifest)
    if len(entries) > n:
        entries = random.Random(seed).sample(entries, n)
    featurizer = make_featurizer(fm.preprocessor, fm.featurizer_state)
    feats = [featurizer.file(e["audio_filepath"]).numpy().astype(np.float32) for e in entries]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feats)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"features": x}

    out = work / f"ort_real_s{seed}.onnx"
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="the float .nemo (the float row of qpipe eval)")
    ap.add_argument("--eval-manifest", required=True)
    ap.add_argument("--real-manifest", required=True, help="real audio for calibrate-data / ORT; not the test set")
    ap.add_argument("--real-utterances", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sources", default=",".join(SOURCES))
    ap.add_argument("--improved", default=IMPROVED, help="pipeline element with {seed} (and {targets})")
    ap.add_argument("--improved-targets", default=None,
                    help="targets of the improved calibration (default: the statistics the model has, bn/ln, +ctc+tv)")
    ap.add_argument("--folded", default=None, help="quantize this BN-folded export (tools/fold_bn_export.py) instead")
    ap.add_argument("--frames", action="store_true", help="also the non-blank greedy-frame match against float")
    ap.add_argument("--ort", action="store_true", help="also ONNX Runtime quantize_static on real audio (needs --folded)")
    ap.add_argument("--work", default="/tmp/qpipe-calibration-table")
    ap.add_argument("--target", default="reference",
                    help="the target each output is written for (onnx-qdq: the same integers, scored ~13x faster on a Conformer)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-quantize", action="store_true")
    args = ap.parse_args(argv)
    args.sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.folded:
        from fold_bn_export import load_folded

        fm = load_folded(args.folded)
    else:
        from qpipe.frontends.nemo import load_nemo

        fm = load_nemo(args.model)
    has_bn = any("batch_norm" in str(n.target) for n in fm.gm.graph.nodes)
    has_ln = any("layer_norm" in str(n.target) for n in fm.gm.graph.nodes)
    stat = "+".join(k for k, h in (("bn", has_bn), ("ln", has_ln)) if h)
    if args.improved_targets is None:
        args.improved_targets = (stat + "+ctc+tv") if stat else "ctc+tv"
    print(f"model: {args.folded or args.model}; BatchNorm: {has_bn}, LayerNorm: {has_ln}; "
          f"improved = {args.improved.format(seed='S', targets=args.improved_targets)}", flush=True)
    outs, errors = quantize_all(fm, args, work)

    eval_json = work / "eval.json"
    cmd = [sys.executable, str(ROOT / "tools" / "qpipe"), "eval", args.model, *[str(o) for _, _, o in outs],
           "--manifest", args.eval_manifest, "--json", str(eval_json), "--quiet"]
    print("$ qpipe eval " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)
    result = json.loads(eval_json.read_text())
    rows = {Path(r["path"]).name: r for r in result["models"]}
    float_row = next(r for r in result["models"] if r["kind"] == "float")

    frames: dict[str, float] = {}
    ort_rows: list[dict] = []
    if args.frames or args.ort:
        from qpipe.asr.metrics import corpus_counts, error_counts
        from qpipe.asr.decode import greedy_ctc
        from qpipe.backends import open_folder

        utts = eval_features(fm, args.eval_manifest)
        blank = len(fm.vocabulary)
        with torch.no_grad():
            float_ids = [fm.gm(x)[0].argmax(-1) for _, x in utts]
        for source, seed, out in outs:
            qm = open_folder(str(out))
            ids = [qm.logits_int(x)[0].argmax(-1) for _, x in utts]
            m, t = frame_match(float_ids, ids, blank)
            frames[out.name] = m / t
        if args.ort:
            import numpy as np
            import onnxruntime as ort

            for seed in range(args.seeds):
                path = ort_quantize(Path(args.folded) / "model.onnx", work, fm, args.real_manifest,
                                    args.real_utterances, seed)
                sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                outs_ort = [torch.from_numpy(sess.run(None, {"features": x.numpy()})[0]) for _, x in utts]
                ids = [o[0].argmax(-1) for o in outs_ort]
                m, t = frame_match(float_ids, ids, blank)
                counts = corpus_counts(error_counts(ref, greedy_ctc(o, fm.vocabulary)[0]) for (ref, _), o in zip(utts, outs_ort))
                ort_rows.append({"seed": seed, "frames": m / t, "wer": 100 * counts.wer, "cer": 100 * counts.cer})
                print(f"[ort] quantize_static real audio seed {seed}: WER {100 * counts.wer:.2f} CER {100 * counts.cer:.2f} "
                      f"non-blank frame match {100 * m / t:.2f}%", flush=True)

    print(f"\nsummary: {result['utterances']} utterances, {float_row['reference_words']} words; "
          f"float WER {float_row['wer']:.2f} CER {float_row['cer']:.2f}; {args.seeds} seeds")
    head = f"{'source':9s} {'runs':>4s} {'WER mean':>9s} {'min':>6s} {'max':>6s} {'dWER':>6s} {'CER mean':>8s}"
    print(head + (f" {'frames %':>8s}" if frames else ""))
    summary = {"model": args.model, "folded": args.folded, "improved": args.improved.format(seed="S", targets=args.improved_targets),
               "real_manifest": args.real_manifest, "float": {"wer": float_row["wer"], "cer": float_row["cer"]},
               "sources": {}, "errors": errors, "ort": ort_rows}
    for source in args.sources:
        rs = [(o.name, rows[o.name]) for s, _, o in outs if s == source and o.name in rows]
        if not rs:
            print(f"{source:9s}    0  {errors.get(source, 'no runs')}")
            continue
        wers = [r["wer"] for _, r in rs]
        cers = [r["cer"] for _, r in rs]
        fr = [frames[n] for n, _ in rs if n in frames]
        entry = {"wer": wers, "cer": cers, "frames": fr}
        summary["sources"][source] = entry
        line = (f"{source:9s} {len(rs):4d} {statistics.fmean(wers):9.2f} {min(wers):6.2f} {max(wers):6.2f} "
                f"{statistics.fmean(wers) - float_row['wer']:+6.2f} {statistics.fmean(cers):8.2f}")
        print(line + (f" {100 * statistics.fmean(fr):8.2f}" if fr else ""))
    if ort_rows:
        wers = [r["wer"] for r in ort_rows]
        print(f"{'ORT-real':9s} {len(wers):4d} {statistics.fmean(wers):9.2f} {min(wers):6.2f} {max(wers):6.2f} "
              f"{statistics.fmean(wers) - float_row['wer']:+6.2f} {statistics.fmean(r['cer'] for r in ort_rows):8.2f} "
              f"{100 * statistics.fmean(r['frames'] for r in ort_rows):8.2f}")
    if frames:
        print("frames %: share of the float model's non-blank frames whose greedy token the quantized model keeps")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "frames": frames,
                                               "eval": {k: v for k, v in result.items() if k != "per_utterance"}}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
