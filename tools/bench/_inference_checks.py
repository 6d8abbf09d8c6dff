"""The must-shows of issue 21 that a latency table cannot show, for ``tools/bench/inference.py``.

* what ONNX Runtime's optimizer made of each QDQ model (QLinearConv / QLinearAdd /
  left-over float Conv and Add / DequantizeLinear ... in the graph it runs), and,
  where qpipe's onnx-qdq is slower than ORT's own uint8 model, a profile by op type;
* onnx-qdq's integer logits against the reference's: the largest difference in
  quantization steps (the logits are int16 codes), the share of logits that differ,
  the share of frames whose greedy token (argmax) is the same;
* WER / CER on the held-out set of every candidate (greedy CTC, qpipe's one text
  normalization, the same features for all).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

FUSION_OPS = ("QLinearConv", "QLinearAdd", "ConvInteger", "MatMulInteger", "Conv", "Add", "QuantizeLinear",
              "DequantizeLinear", "QLinearMatMul", "MatMul", "Gemm")


def fusion_summary(counts: dict[str, int]) -> dict[str, int]:
    """The op types that say whether ORT runs a model on integer kernels (others summed as 'other')."""
    out = {k: counts.get(k, 0) for k in FUSION_OPS if counts.get(k, 0)}
    out["other"] = sum(v for k, v in counts.items() if k not in FUSION_OPS)
    return out


def ort_graphs(models: dict[str, str], threads: int) -> dict[str, Any]:
    """Per candidate: op counts of the file and of ORT's optimized graph."""
    from _inference_prepare import _ort_module

    ort = _ort_module()
    out = {}
    for name, path in models.items():
        out[name] = {"file": fusion_summary(ort.file_op_counts(path)),
                     "optimized": fusion_summary(ort.optimized_op_counts(path, threads))}
    return out


def ort_profiles(models: dict[str, str], features: np.ndarray, threads: int) -> dict[str, Any]:
    from _inference_prepare import _ort_module

    ort = _ort_module()
    return {name: ort.profile_by_op(path, features, threads) for name, path in models.items()}


def _compare(ref, test) -> dict[str, Any]:
    import torch

    d = (ref.to(torch.int64) - test.to(torch.int64)).abs()
    same_token = (ref.argmax(-1) == test.argmax(-1))
    return {"max_abs_diff_steps": int(d.max()) if d.numel() else 0,
            "logits": int(d.numel()), "logits_differing": int((d != 0).sum()),
            "frames": int(same_token.numel()), "frames_same_token": int(same_token.sum()),
            "bit_identical": bool(d.max() == 0) if d.numel() else True}


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out = {"max_abs_diff_steps": max(p["max_abs_diff_steps"] for p in parts),
           "logits": sum(p["logits"] for p in parts), "logits_differing": sum(p["logits_differing"] for p in parts),
           "frames": sum(p["frames"] for p in parts), "frames_same_token": sum(p["frames_same_token"] for p in parts),
           "utterances_bit_identical": sum(1 for p in parts if p["bit_identical"]), "utterances": len(parts)}
    out["share_frames_same_token"] = round(out["frames_same_token"] / max(out["frames"], 1), 6)
    out["share_logits_differing"] = round(out["logits_differing"] / max(out["logits"], 1), 8)
    return out


def agreement(reference: str, other: str, feat_in: int, frames: int, threads: int, heldout: bool,
              limit: Optional[int] = None, random_batch: int = 8,
              progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """``other``'s integer logits against the reference folder's, on random features and on the held-out set."""
    import torch

    from qpipe.backends import open_folder

    os.environ.setdefault("QPIPE_ORT_THREADS", str(threads))
    torch.set_num_threads(threads)
    ref, test = open_folder(reference), open_folder(other)
    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(random_batch, feat_in, frames, generator=g)
    started = time.perf_counter()
    r = _compare(ref.logits_int(x), test.logits_int(x))
    out["random_features"] = {"input": f"randn({random_batch}, {feat_in}, {frames}), seed 0", **_merge([r])}
    out["random_features"].pop("utterances_bit_identical")
    out["random_features"]["bit_identical"] = r["bit_identical"]
    progress(f"  random features: max |diff| {r['max_abs_diff_steps']} steps ({time.perf_counter() - started:.0f} s)")
    if heldout:
        from _inference_prepare import HELDOUT
        from qpipe.frontends.audio import read_manifest

        fz = ref.featurizer()
        parts = []
        entries = read_manifest(HELDOUT)
        for i, item in enumerate(entries[:limit] if limit else entries):
            f = fz.file(item["audio_filepath"])
            parts.append(_compare(ref.logits_int(f), test.logits_int(f)))
            if (i + 1) % 25 == 0:
                progress(f"  held-out: {i + 1} utterances")
        out["heldout_features"] = {"input": f"{len(parts)} held-out utterances through the folder's featurizer", **_merge(parts)}
    return out


def wer(onnx_models: dict[str, str], folders: dict[str, str], threads: int, limit: Optional[int] = None,
        progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """WER/CER on the held-out set: ONNX models (float log-probs) and qpipe folders (integer logits)."""
    import torch

    from _inference_prepare import HELDOUT, _ort_module
    from qpipe.backends import open_folder

    ort = _ort_module()
    os.environ.setdefault("QPIPE_ORT_THREADS", str(threads))
    torch.set_num_threads(threads)
    qms = {name: open_folder(path) for name, path in folders.items()}
    first = next(iter(qms.values()))
    models: dict[str, Callable] = {name: ort.onnx_forward(path, threads) for name, path in onnx_models.items()}
    models.update({name: qm.logits_int for name, qm in qms.items()})
    return ort.evaluate_wer(HELDOUT, models, first.featurizer(), first.vocabulary, limit, progress)
