#!/usr/bin/env python3
"""ONNX Runtime's own int8 baselines of a model: what a user picks instead of qpipe.

The float model as ONNX (``torch.onnx.export``'s TorchScript exporter, as NeMo's own
``export()`` uses; batch and time dynamic), then ``onnxruntime.quantization``'s
``quantize_static`` in the QDQ format: weights int8 per output channel, activations
int8 or uint8 per tensor, MinMax calibration through a ``CalibrationDataReader`` on
real features, after ORT's recommended ``quant_pre_process``. Also: the op types of
ORT's optimized graph (what it fused), an ORT profile by op type, and a WER/CER
evaluator for ONNX models and qpipe output folders on one manifest.

    # float.onnx, qdq_int8.onnx, qdq_uint8.onnx of a .nemo, calibrated on 32 held-out utterances
    python tools/bench/ort_baseline.py build models/demo_quartznet.nemo /tmp/ortq \\
        --manifest data/eval/heldout/manifest.json --calib 32
    # WER/CER side by side (same features, one normalization, greedy CTC)
    python tools/bench/ort_baseline.py eval --manifest data/eval/heldout/manifest.json \\
        --folder OUT_onnx_qdq --onnx ort_uint8=/tmp/ortq/qdq_uint8.onnx
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

INPUT_NAME = "features"
OPSET = 17
ACTIVATIONS = ("int8", "uint8")


# --------------------------------------------------------------------------- float export


def export_module_onnx(module, example, path: str, opset: int = OPSET) -> str:
    """``module`` (features (B, F, T) -> (B, T', V)) as ONNX with dynamic batch and time."""
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, tracer warnings
        torch.onnx.export(module.eval(), (example,), path, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=["logprobs"],
                          dynamic_axes={INPUT_NAME: {0: "batch", 2: "time"}, "logprobs": {0: "batch", 1: "frames"}})
    return path


def export_nemo_onnx(nemo_path: str, path: str, opset: int = OPSET) -> str:
    """A .nemo CTC model's encoder + decoder as ONNX (NeMo's export preparation, type checks off)."""
    import torch

    from qpipe.frontends.nemo import CTCGraph, quiet_nemo, restore

    model = restore(nemo_path)
    with quiet_nemo():
        from nemo.core.classes.common import typecheck
    model.encoder._prepare_for_export()
    if hasattr(model.decoder, "_prepare_for_export"):
        model.decoder._prepare_for_export()
    graph = CTCGraph(model.encoder, model.decoder).eval()
    example = torch.randn(1, int(model.encoder._feat_in), 256)
    with typecheck.disable_checks():
        return export_module_onnx(graph, example, path, opset)


# --------------------------------------------------------------------------- quantize_static


def _reader(features: Sequence[np.ndarray]):
    from onnxruntime.quantization import CalibrationDataReader

    class FeatureReader(CalibrationDataReader):
        """One calibration utterance (1, F, T) per call, then None."""

        def __init__(self) -> None:
            self._it = iter(features)

        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            x = next(self._it, None)
            return None if x is None else {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)}

        def rewind(self) -> None:
            self._it = iter(features)

    return FeatureReader()


def quantize_qdq(float_onnx: str, out_path: str, features: Sequence[np.ndarray], activations: str = "uint8") -> dict[str, Any]:
    """``quantize_static`` QDQ: per-channel int8 weights, ``activations`` (int8|uint8) per tensor, MinMax."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    if activations not in ACTIVATIONS:
        raise ValueError(f"activations: one of {ACTIVATIONS}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qpipe-ortq-") as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        quant_pre_process(float_onnx, pre)  # what ORT's docs ask before quantize_static (shape inference, fusions)
        quantize_static(pre, out_path, _reader(features), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return {"activations": activations, "weights": "int8 per channel", "calibration": "MinMax",
            "calibration_utterances": len(features), "pre_process": True, "seconds": round(time.perf_counter() - started, 1)}


# --------------------------------------------------------------------------- what ORT made of it


def session(path: str, threads: int = 2, optimized_path: Optional[str] = None, profile_prefix: Optional[str] = None):
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # not the warning that an optimized model file is machine-specific
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def file_op_counts(path: str) -> dict[str, int]:
    import onnx

    model = onnx.load(path, load_external_data=False)
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def optimized_op_counts(path: str, threads: int = 2) -> dict[str, int]:
    """Op types of the graph ORT runs after its optimizer (QLinearConv, QLinearAdd, left-over Conv, ...)."""
    with tempfile.TemporaryDirectory(prefix="qpipe-ortopt-") as tmp:
        opt = os.path.join(tmp, "optimized.onnx")
        session(path, threads, optimized_path=opt)
        return file_op_counts(opt)


def profile_by_op(path: str, features: np.ndarray, threads: int = 2, runs: int = 3) -> dict[str, Any]:
    """ORT's profiler: total kernel time per op type over ``runs`` calls (after one warm-up), in ms and shares."""
    with tempfile.TemporaryDirectory(prefix="qpipe-ortprof-") as tmp:
        sess = session(path, threads, profile_prefix=os.path.join(tmp, "prof"))
        name = sess.get_inputs()[0].name
        x = np.ascontiguousarray(features, dtype=np.float32)
        sess.run(None, {name: x})
        for _ in range(runs):
            sess.run(None, {name: x})
        prof = sess.end_profiling()
        with open(prof) as f:
            events = json.load(f)
    per_op: dict[str, float] = collections.defaultdict(float)
    runs_seen = 0
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            runs_seen += 1
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            per_op[e.get("args", {}).get("op_name", "?")] += float(e.get("dur", 0))
    total = sum(per_op.values()) or 1.0
    calls = max(runs_seen, 1)
    return {"calls": calls,
            "ms_per_call": {k: round(v / calls / 1e3, 3) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])},
            "share": {k: round(v / total, 4) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])},
            "kernel_ms_per_call": round(total / calls / 1e3, 3)}


# --------------------------------------------------------------------------- WER / CER


def heldout_features(manifest: str, featurizer, limit: Optional[int] = None) -> Iterable[tuple[dict[str, Any], Any]]:
    """(manifest entry, features (1, F, T)) for each utterance, audio paths resolved as qpipe does."""
    from qpipe.frontends.audio import read_manifest

    entries = read_manifest(manifest)
    for item in entries[:limit] if limit else entries:
        yield item, featurizer.file(item["audio_filepath"])


def onnx_forward(path: str, threads: int = 2) -> Callable:
    """An ONNX model as features (torch, (1, F, T)) -> its output (torch)."""
    import torch

    sess = session(path, threads)
    name = sess.get_inputs()[0].name

    def forward(features):
        return torch.from_numpy(sess.run(None, {name: features.numpy().astype(np.float32)})[0])

    return forward


def evaluate_wer(manifest: str, models: dict[str, Callable], featurizer, vocabulary: list[str],
                 limit: Optional[int] = None, progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Corpus WER/CER (percent) of each model (features -> logits or log-probs) with greedy CTC decoding.

    Every model sees the same features; texts go through qpipe's one normalization.
    """
    from qpipe.asr.decode import greedy_ctc
    from qpipe.asr.metrics import NORMALIZATION, corpus_counts, error_counts, normalize_text

    counts: dict[str, list] = {name: [] for name in models}
    n = 0
    for item, feats in heldout_features(manifest, featurizer, limit):
        ref = normalize_text(item.get("text") or "")
        for name, fwd in models.items():
            hyp = greedy_ctc(fwd(feats), vocabulary)[0]
            counts[name].append(error_counts(ref, hyp, normalize=True))
        n += 1
        if n % 25 == 0:
            progress(f"  eval: {n} utterances")
    rows = {}
    for name, cs in counts.items():
        t = corpus_counts(cs)
        rows[name] = {"wer": None if t.wer is None else round(100 * t.wer, 3),
                      "cer": None if t.cer is None else round(100 * t.cer, 3),
                      "word_errors": t.word_edits, "reference_words": t.ref_words,
                      "char_errors": t.char_edits, "reference_chars": t.ref_chars}
    return {"manifest": os.path.abspath(manifest), "utterances": n, "decoding": "greedy CTC",
            "normalization": NORMALIZATION, "models": rows}


# --------------------------------------------------------------------------- CLI


def _nemo_featurizer(nemo_path: str):
    from qpipe.frontends.features import make_featurizer
    from qpipe.frontends.mel import mel_state_from_nemo
    from qpipe.frontends.nemo import _plain, read_nemo_config, restore

    cfg = read_nemo_config(nemo_path)
    model = restore(nemo_path, cfg)
    pre = _plain(cfg.get("preprocessor")) or {}
    return make_featurizer(pre, mel_state_from_nemo(model.preprocessor, int(pre.get("sample_rate", 16000))))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="float.onnx and quantize_static QDQ models (int8 and uint8 activations) of a .nemo")
    b.add_argument("nemo")
    b.add_argument("out_dir")
    b.add_argument("--manifest", required=True, help="calibration audio (a NeMo manifest)")
    b.add_argument("--calib", type=int, default=32, help="calibration utterances (first N of the manifest)")
    e = sub.add_parser("eval", help="WER/CER of ONNX models and qpipe output folders on a manifest")
    e.add_argument("--manifest", required=True)
    e.add_argument("--folder", action="append", default=[], help="a qpipe output folder (any target); gives features + vocabulary")
    e.add_argument("--onnx", action="append", default=[], metavar="NAME=PATH", help="an ONNX model (features -> log-probs)")
    e.add_argument("--limit", type=int)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--json")
    a = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if a.cmd == "build":
        os.makedirs(a.out_dir, exist_ok=True)
        float_onnx = export_nemo_onnx(a.nemo, os.path.join(a.out_dir, "float.onnx"))
        feats = [f.numpy() for _, f in heldout_features(a.manifest, _nemo_featurizer(a.nemo), a.calib)]
        for act in ACTIVATIONS:
            out = os.path.join(a.out_dir, f"qdq_{act}.onnx")
            info = quantize_qdq(float_onnx, out, feats, act)
            log(f"{out}: {info}; ORT runs {optimized_op_counts(out)}")
        return 0
    import torch

    from qpipe.backends import open_folder

    torch.set_num_threads(a.threads)
    if not a.folder:
        ap.error("eval needs at least one --folder (its featurizer and vocabulary decode every model)")
    qms = [open_folder(f) for f in a.folder]
    models: dict[str, Callable] = {}
    for f, qm in zip(a.folder, qms):
        models[f"qpipe {qm.target.name} ({os.path.basename(os.path.normpath(f))})"] = qm.logits_int
    for spec in a.onnx:
        name, _, path = spec.partition("=")
        models[name] = onnx_forward(path, a.threads)
    result = evaluate_wer(a.manifest, models, qms[0].featurizer(), qms[0].vocabulary, a.limit, log)
    for name, r in result["models"].items():
        print(f"{name:<40} WER {r['wer']:6.2f} %  CER {r['cer']:6.2f} %")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
