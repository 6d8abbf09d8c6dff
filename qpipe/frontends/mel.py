"""NeMo's mel-spectrogram front end in plain PyTorch, from the buffers NeMo computed.

A quantized output keeps the float front end (as Q-ASR does): the filterbank,
window and settings of the model's own ``FilterbankFeatures`` are saved beside
the integer program, so ``qpipe transcribe`` needs neither NeMo nor its 9 s import.
``tests/frontends/test_mel.py`` checks it against NeMo's output.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qpipe.frontends.audio import load_audio
from qpipe.ir.errors import QpipeError

_CONSTANT = 1e-5  # NeMo's std guard in normalize_batch


def mel_state_from_nemo(preprocessor: torch.nn.Module, sample_rate: int) -> dict[str, Any] | None:
    """Settings and buffers of a NeMo AudioToMelSpectrogramPreprocessor, or None if unsupported."""
    f = getattr(preprocessor, "featurizer", None)
    if f is None or getattr(f, "frame_splicing", 1) != 1 or getattr(f, "nb_augmentation_prob", 0.0) > 0:
        return None
    guard = f.log_zero_guard_value
    if isinstance(guard, str):
        guard = {"tiny": float(torch.finfo(torch.float32).tiny), "eps": float(torch.finfo(torch.float32).eps)}.get(guard)
        if guard is None:
            return None
    if f.normalize not in ("per_feature", "all_features", None) or f.log_zero_guard_type not in ("add", "clamp"):
        return None
    return {
        "sample_rate": int(sample_rate),
        "n_fft": int(f.n_fft),
        "hop_length": int(f.hop_length),
        "win_length": int(f.win_length),
        "window": f.window.detach().clone().float() if f.window is not None else None,
        "fb": f.fb.detach().clone().float(),
        "preemph": None if f.preemph is None else float(f.preemph),
        "mag_power": float(f.mag_power),
        "log": bool(f.log),
        "guard_type": str(f.log_zero_guard_type),
        "guard_value": float(guard),
        "normalize": f.normalize,
        "stft_pad_amount": f.stft_pad_amount,
        "exact_pad": bool(getattr(f, "exact_pad", False)),
    }


class MelFeaturizer:
    """(1, features, frames) log-mel features for one utterance, matching NeMo in eval mode."""

    def __init__(self, state: dict[str, Any]):
        self.s = state
        self.sample_rate = int(state["sample_rate"])

    def __call__(self, audio: np.ndarray) -> torch.Tensor:
        s = self.s
        x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)).unsqueeze(0)
        n = x.shape[1]
        pad = s["stft_pad_amount"]
        pad_amount = pad * 2 if pad is not None else s["n_fft"] // 2 * 2
        frames = (n + pad_amount - s["n_fft"]) // s["hop_length"]  # NeMo drops the last, partial frame
        if frames < 2:
            raise QpipeError(f"audio too short for features: {n} samples")
        if pad is not None:
            x = torch.nn.functional.pad(x.unsqueeze(1), (pad, pad), "constant").squeeze(1)
        if s["preemph"] is not None:
            x = torch.cat((x[:, :1], x[:, 1:] - s["preemph"] * x[:, :-1]), dim=1)
        spec = torch.stft(
            x,
            n_fft=s["n_fft"],
            hop_length=s["hop_length"],
            win_length=s["win_length"],
            center=not s["exact_pad"],
            window=s["window"],
            return_complex=True,
            pad_mode="constant",
        )
        mag = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1))
        if s["mag_power"] != 1.0:
            mag = mag.pow(s["mag_power"])
        feats = torch.matmul(s["fb"].to(mag.dtype), mag)
        if s["log"]:
            g = s["guard_value"]
            feats = torch.log(feats + g) if s["guard_type"] == "add" else torch.log(torch.clamp(feats, min=g))
        feats = feats[:, :, :frames]
        if s["normalize"] == "per_feature":
            mean = feats.mean(dim=2, keepdim=True)
            std = feats.std(dim=2, keepdim=True) + _CONSTANT
            feats = (feats - mean) / std
        elif s["normalize"] == "all_features":
            feats = (feats - feats.mean()) / (feats.std() + _CONSTANT)
        return feats.contiguous()

    def file(self, path: str) -> torch.Tensor:
        return self(load_audio(path, self.sample_rate))
