"""Audio in, float mel features out: the part of the model that stays floating point.

The featurizer is NeMo's own ``AudioToMelSpectrogramPreprocessor`` rebuilt from
the config stored with the model (imported lazily: NeMo takes ~9 s to import),
so features match what the model was trained on.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np
import torch

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


class Featurizer:
    """NeMo's mel preprocessor from its config, deterministic (no dither) and in eval mode."""

    def __init__(self, preprocessor_cfg: Optional[dict[str, Any]]):
        if not preprocessor_cfg:
            raise QpipeError("the model carries no preprocessor config; cannot turn audio into features")
        from qpipe.frontends.nemo import quiet_nemo

        cfg = dict(preprocessor_cfg)
        cfg["dither"] = 0.0
        self.sample_rate = int(cfg.get("sample_rate", 16000))
        with quiet_nemo():
            from omegaconf import OmegaConf
            from nemo.collections.asr.modules import AudioToMelSpectrogramPreprocessor

            cfg.pop("_target_", None)
            self.module = AudioToMelSpectrogramPreprocessor.from_config_dict(OmegaConf.create({"_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor", **cfg}))
        self.module.eval()

    def __call__(self, audio: np.ndarray) -> torch.Tensor:
        """(1, features, frames) for one utterance."""
        signal = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)).unsqueeze(0)
        length = torch.tensor([signal.shape[1]])
        with torch.no_grad():
            feats, feat_len = self.module(input_signal=signal, length=length)
        return feats[:, :, : int(feat_len[0])]

    def file(self, path: str) -> torch.Tensor:
        return self(load_audio(path, self.sample_rate))


def make_featurizer(preprocessor_cfg: Optional[dict[str, Any]], featurizer_state: Optional[dict[str, Any]] = None):
    """The NeMo-free featurizer when the model's front-end buffers are known, else NeMo's own."""
    if featurizer_state:
        from qpipe.frontends.mel import MelFeaturizer

        return MelFeaturizer(featurizer_state)
    return Featurizer(preprocessor_cfg)
