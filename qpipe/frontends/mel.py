"""NeMo's mel-spectrogram front end in plain PyTorch, from the buffers NeMo computed.

A quantized output keeps the float front end (as Q-ASR does): the filterbank,
window and settings of the model's own ``FilterbankFeatures`` are saved beside
the integer program, so ``qpipe transcribe`` needs neither NeMo nor its 9 s import.
``tests/frontends/test_mel.py`` checks it against NeMo's output.
"""
from __future__ import annotations

import math
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


MIN_FRAMES = 2  # what per-feature normalization (a std over time) needs


def too_short(name: str, samples: int, frames: int, min_frames: int, min_samples: int, sample_rate: int) -> QpipeError:
    """The one message for audio shorter than the model takes (transcribe, eval, calibrate-data)."""
    ms = lambda n: f"{1000.0 * n / sample_rate:.0f} ms"  # noqa: E731
    return QpipeError(
        f"{name}: audio too short: {ms(samples)} ({samples} samples, {max(frames, 0)} feature frames); "
        f"this model needs at least {ms(min_samples)} ({min_frames} frames)"
    )


def stft_frames(samples: int, n_fft: int, hop: int, pad_amount: int) -> int:
    """NeMo's frame count (it drops the last, partial frame)."""
    return (samples + pad_amount - n_fft) // hop


def min_samples_for(frames: int, n_fft: int, hop: int, pad_amount: int) -> int:
    """The fewest samples that give ``frames`` frames (inverse of :func:`stft_frames`)."""
    return max(1, frames * hop + n_fft - pad_amount)


def frame_geometry(preprocessor_cfg: dict[str, Any]) -> tuple[int, int, int]:
    """(n_fft, hop, pad_amount) of a NeMo preprocessor config, as :func:`stft_frames` takes them."""
    sr = int(preprocessor_cfg.get("sample_rate", 16000))
    hop = int(round(float(preprocessor_cfg.get("window_stride", 0.01)) * sr))
    win = int(round(float(preprocessor_cfg.get("window_size", 0.02)) * sr))
    n_fft = int(preprocessor_cfg.get("n_fft") or 2 ** math.ceil(math.log2(max(win, 2))))
    return n_fft, hop, n_fft // 2 * 2


class MelFeaturizer:
    """(1, features, frames) log-mel features for one utterance, matching NeMo in eval mode.

    ``min_frames``: the fewest frames the model takes (its exported program's guard);
    shorter audio is one QpipeError line naming the minimum length, before any work.
    """

    def __init__(self, state: dict[str, Any], min_frames: int = MIN_FRAMES):
        self.s = state
        self.sample_rate = int(state["sample_rate"])
        self.min_frames = max(MIN_FRAMES, int(min_frames))
        pad = state["stft_pad_amount"]
        self._pad_amount = pad * 2 if pad is not None else state["n_fft"] // 2 * 2

    def frames(self, samples: int) -> int:
        return stft_frames(samples, self.s["n_fft"], self.s["hop_length"], self._pad_amount)

    @property
    def min_samples(self) -> int:
        """The shortest audio (in samples at ``sample_rate``) this featurizer and model take."""
        return min_samples_for(self.min_frames, self.s["n_fft"], self.s["hop_length"], self._pad_amount)

    def check_length(self, samples: int, name: str = "audio") -> None:
        frames = self.frames(samples)
        if frames < self.min_frames:
            raise too_short(name, samples, frames, self.min_frames, self.min_samples, self.sample_rate)

    def __call__(self, audio: np.ndarray, name: str = "audio") -> torch.Tensor:
        s = self.s
        x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)).unsqueeze(0)
        n = x.shape[1]
        pad = s["stft_pad_amount"]
        self.check_length(n, name)
        frames = self.frames(n)
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
        return self(load_audio(path, self.sample_rate), name=path)
