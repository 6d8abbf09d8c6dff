"""Male-to-female voice conversion of training audio (Praat's "Change gender").

sox's ``pitch`` effect scales fundamental and formants by the same factor, so a male
voice shifted up 9 semitones has a 1.7x vocal tract: a cartoon, not a woman.  Women's
voices differ from men's by about 1.7-2x in F0 but only 1.1-1.25x in formants.  Praat
(via ``praat-parselmouth``) changes the two separately: PSOLA moves the pitch, a
resample-and-stretch moves the formants, the duration stays.  Used on the male voices
of the natural-sounding engines (flite kal/awb/rms, piper joe), whose only female
counterpart (flite ``slt``) is held out.
"""

from __future__ import annotations

import math

import numpy as np

PITCH_FLOOR_HZ = 60.0
PITCH_CEILING_HZ = 500.0


def _pitch(x: np.ndarray, sample_rate: int):
    import parselmouth
    snd = parselmouth.Sound(np.asarray(x, dtype=np.float64), sampling_frequency=sample_rate)
    return snd, snd.to_pitch(pitch_floor=PITCH_FLOOR_HZ, pitch_ceiling=PITCH_CEILING_HZ)


def _median_hz(pitch) -> float | None:
    from parselmouth.praat import call
    f0 = call(pitch, "Get quantile", 0, 0, 0.5, "Hertz")
    return float(f0) if math.isfinite(f0) else None


def median_f0(x: np.ndarray, sample_rate: int) -> float | None:
    """Median F0 of the voiced frames (Hz), or None when nothing is voiced."""
    return _median_hz(_pitch(x, sample_rate)[1])


def change_gender(x: np.ndarray, sample_rate: int, formant_ratio: float, pitch_median: float,
                  only_below_hz: float | None = 150.0, seed: int = 0) -> np.ndarray | None:
    """Return ``x`` with formants scaled by ``formant_ratio`` and median F0 moved to
    ``pitch_median`` Hz (same length and rate), or None when ``x`` is unvoiced or its
    median F0 is already at or above ``only_below_hz`` (not a male-range voice).

    Praat's overlap-add draws random periods for the unvoiced stretches; ``seed`` seeds
    Praat's generator first, so a corpus re-render is bit-identical."""
    if not 0.5 <= formant_ratio <= 2.0:
        raise ValueError(f"formant_ratio must be in [0.5, 2], not {formant_ratio}")
    if not PITCH_FLOOR_HZ <= pitch_median <= PITCH_CEILING_HZ:
        raise ValueError(f"pitch_median must be in [{PITCH_FLOOR_HZ}, {PITCH_CEILING_HZ}] Hz,"
                         f" not {pitch_median}")
    import parselmouth
    from parselmouth.praat import call
    snd, pitch = _pitch(x, sample_rate)  # one pitch analysis: the check and the conversion
    f0 = _median_hz(pitch)
    if f0 is None or (only_below_hz is not None and f0 >= only_below_hz):
        return None
    parselmouth.praat.run(f"random_initializeWithSeedUnsafelyButPredictably ({int(seed)})\n")
    out = call([snd, pitch], "Change gender", formant_ratio, pitch_median, 1.0, 1.0)
    y = np.asarray(out.values[0], dtype=np.float32)
    if out.sampling_frequency != sample_rate:
        raise RuntimeError(f"Praat returned {out.sampling_frequency} Hz, not {sample_rate}")
    peak = float(np.max(np.abs(y))) if len(y) else 0.0
    if peak > 0.999:
        y = y * (0.999 / peak)
    return y
