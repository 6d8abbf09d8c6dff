"""Audio files and NeMo manifests in: mono samples at the model's rate, manifest rows.

The bottom of the frontends: the featurizers (``mel``, ``nemo``) read audio
through here, so nothing in this module imports them.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from qpipe.ir.errors import QpipeError


def load_audio(path: str, sample_rate: int = 16000) -> np.ndarray:
    """Mono float32 samples at ``sample_rate`` (resampled if the file differs)."""
    import soundfile as sf

    if not os.path.isfile(path):
        raise QpipeError(f"no such audio file: {path}")
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as exc:
        raise QpipeError(f"cannot read audio {path}: {exc}") from None
    data = data.mean(axis=1)
    if sr != sample_rate:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(int(sr), int(sample_rate))
        data = resample_poly(data, sample_rate // g, int(sr) // g).astype(np.float32)
    return data


def read_manifest(path: str) -> list[dict[str, Any]]:
    """NeMo manifest (JSON lines with audio_filepath, duration, text); relative paths
    are taken relative to the manifest's folder."""
    if not os.path.isfile(path):
        raise QpipeError(f"no such manifest: {path}")
    base = os.path.dirname(os.path.abspath(path))
    entries = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise QpipeError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            if not isinstance(item, dict) or "audio_filepath" not in item:
                raise QpipeError(f"{path}:{lineno}: entry has no audio_filepath")
            audio = item["audio_filepath"]
            if not os.path.isabs(audio):
                item["audio_filepath"] = os.path.join(base, audio)
            item.setdefault("text", "")
            entries.append(item)
    if not entries:
        raise QpipeError(f"{path}: manifest is empty")
    return entries
