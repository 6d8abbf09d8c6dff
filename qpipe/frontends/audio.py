"""Audio files and NeMo manifests in: mono samples at the model's rate, manifest rows.

The bottom of the frontends: the featurizers (``mel``, ``nemo``) read audio
through here, so nothing in this module imports them.

What is done to audio on the way in (resampling, mixing channels down) is said
once per run on stderr (``qpipe: note: ...``), never silently; what cannot be
read is one QpipeError line that names the file.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from qpipe.ir.errors import QpipeError

_noted: set[str] = set()
_note_sink: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)


def note_once(key: str, message: str) -> None:
    """Tell the user once per process (per ``key``) what was done to their input."""
    if key in _noted:
        return
    _noted.add(key)
    _note_sink(f"qpipe: note: {message}")


def reset_notes() -> None:
    """Forget which notes were given (tests; a long-lived process starting a new run)."""
    _noted.clear()


@dataclass(frozen=True)
class AudioInfo:
    """What the file's header says, without decoding it."""

    frames: int
    sample_rate: int
    channels: int

    def samples_at(self, sample_rate: int) -> int:
        """How many samples the file has after resampling to ``sample_rate`` (as load_audio does)."""
        if self.sample_rate == sample_rate:
            return self.frames
        return -(-self.frames * sample_rate // self.sample_rate)


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise QpipeError(f"no such audio file: {path}")
    if not os.path.isfile(path):
        raise QpipeError(f"{path} is not an audio file (a folder?)")
    if os.path.getsize(path) == 0:
        raise QpipeError(f"audio file {path} is empty (0 bytes)")


def _reason(exc: Exception) -> str:
    """soundfile's message without its 'Error opening ...:' prefix (and no dangling colon)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if text.startswith("Error opening") and ":" in text:
        text = text.split(":", 2)[-1].strip() if text.count(":") >= 2 else ""
    text = text.rstrip(":. ").strip()
    return text or type(exc).__name__


def audio_info(path: str) -> AudioInfo:
    """Length, rate and channels from the header (cheap: for checks before slow work)."""
    import soundfile as sf

    _check_file(path)
    try:
        info = sf.info(path)
    except Exception as exc:
        raise QpipeError(f"cannot read audio {path}: {_reason(exc)} (wav, flac and ogg are supported)") from None
    return AudioInfo(int(info.frames), int(info.samplerate), int(info.channels))


def load_audio(path: str, sample_rate: int = 16000) -> np.ndarray:
    """Mono float32 samples at ``sample_rate`` (resampled, with a note, if the file differs)."""
    import soundfile as sf

    _check_file(path)
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as exc:
        raise QpipeError(f"cannot read audio {path}: {_reason(exc)} (wav, flac and ogg are supported)") from None
    if data.shape[0] == 0:
        raise QpipeError(f"audio file {path} has no samples")
    if data.shape[1] > 1:
        note_once(f"mix:{data.shape[1]}", f"mixing {data.shape[1]} channels down to mono (first: {path})")
    data = data.mean(axis=1)
    if sr != sample_rate:
        from math import gcd

        from scipy.signal import resample_poly

        note_once(f"resample:{sr}:{sample_rate}", f"resampling audio from {sr} Hz to the model's {sample_rate} Hz (first: {path})")
        g = gcd(int(sr), int(sample_rate))
        data = resample_poly(data, sample_rate // g, int(sr) // g).astype(np.float32)
    return data


def read_manifest(path: str) -> list[dict[str, Any]]:
    """NeMo manifest (JSON lines with audio_filepath, duration, text); relative paths
    are taken relative to the manifest's folder."""
    if not os.path.isfile(path):
        raise QpipeError(f"no such manifest: {path}" if not os.path.exists(path) else f"manifest {path} is not a file")
    base = os.path.dirname(os.path.abspath(path))
    entries = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise QpipeError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})") from None
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise QpipeError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            if not isinstance(item, dict) or "audio_filepath" not in item:
                raise QpipeError(f"{path}:{lineno}: entry has no audio_filepath")
            audio = item["audio_filepath"]
            if not isinstance(audio, str) or not audio:
                raise QpipeError(f"{path}:{lineno}: audio_filepath is not a path")
            if not os.path.isabs(audio):
                item["audio_filepath"] = os.path.join(base, audio)
            item.setdefault("text", "")
            entries.append(item)
    if not entries:
        raise QpipeError(f"manifest {path} is empty (no JSON lines)")
    return entries
