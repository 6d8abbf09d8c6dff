"""Audio in: header lengths agree with decoding, notes are given once, frame counts invert."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpipe.frontends.audio import audio_info, load_audio, read_manifest, reset_notes
from qpipe.frontends.mel import min_samples_for, stft_frames
from qpipe.ir.errors import QpipeError


def _wav(path, sr, n, channels=1):
    import soundfile as sf

    data = np.random.default_rng(0).standard_normal((n, channels)).astype(np.float32) * 0.1
    sf.write(str(path), data, sr)
    return str(path)


@pytest.mark.parametrize("sr, n", [(8000, 4000), (44100, 22051), (22050, 7), (16000, 321), (48000, 1)])
def test_header_length_is_the_decoded_length(tmp_path, sr, n):
    """eval checks lengths from headers (before slow work); they must be what load_audio gives."""
    path = _wav(tmp_path / "a.wav", sr, n)
    assert audio_info(path).samples_at(16000) == len(load_audio(path, 16000))


def test_resampling_and_mixing_are_noted_once(tmp_path, capsys):
    reset_notes()
    a, b = _wav(tmp_path / "a.wav", 8000, 800), _wav(tmp_path / "b.wav", 8000, 800, channels=2)
    for path in (a, b, a):
        load_audio(path, 16000)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"qpipe: note: resampling audio from 8000 Hz to the model's 16000 Hz (first: {a})",
                   f"qpipe: note: mixing 2 channels down to mono (first: {b})"]
    load_audio(_wav(tmp_path / "c.wav", 16000, 800), 16000)
    assert capsys.readouterr().err == ""  # nothing done, nothing said


def test_manifest_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "m.json"
    bad = b'{"audio_filepath": "b.wav", "text": "caf\xe9"}\n'
    path.write_bytes(b'{"audio_filepath": "a.wav", "text": "ok"}\n' + bad)
    column = bad.index(b"\xe9") + 1
    with pytest.raises(QpipeError, match=rf"m.json:2: not UTF-8 text \(byte 0xe9 at column {column}\)"):
        read_manifest(str(path))


@settings(max_examples=200, deadline=None)
@given(frames=st.integers(1, 400), hop=st.integers(1, 400), n_fft=st.integers(2, 2048), center=st.booleans())
def test_min_samples_is_the_inverse_of_the_frame_count(frames, hop, n_fft, center):
    pad = n_fft // 2 * 2 if center else 0
    n = min_samples_for(frames, n_fft, hop, pad)
    assert stft_frames(n, n_fft, hop, pad) >= frames
    if n > 1:
        assert stft_frames(n - 1, n_fft, hop, pad) < frames
