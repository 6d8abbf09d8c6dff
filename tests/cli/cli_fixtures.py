"""A quantized output folder that transcribes audio without NeMo, and audio files to feed it.

The model is the toy QuartzNet of tests/conftest.py with an unpadded first conv,
so that its exported program, like the demo QuartzNet's, takes no fewer than 5
feature frames (export derives ``T >= 5``): the short-audio cases then test the
same guard the demo model has, in a second instead of a NeMo load.
"""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
import torch

from conftest import FAST_PIPELINE, TinyASR

SAMPLE_RATE = 16000
FEATURES = 8
VOCABULARY = [" ", "a", "b", "c", "d"]  # + blank: TinyASR's 6 classes


class GuardedASR(TinyASR):
    """TinyASR whose depthwise conv has no padding: T' = T - 4, so the program needs T >= 5."""

    def __init__(self):
        super().__init__(features=FEATURES, classes=len(VOCABULARY) + 1)
        self.dw = torch.nn.Conv1d(FEATURES, FEATURES, 5, padding=0, groups=FEATURES, bias=False)


def mel_state() -> dict:
    """The settings and buffers frontends.mel needs (NeMo's 25 ms window / 10 ms hop, 512-point FFT)."""
    gen = torch.Generator().manual_seed(0)
    return {
        "sample_rate": SAMPLE_RATE,
        "n_fft": 512,
        "hop_length": 160,
        "win_length": 400,
        "window": torch.hann_window(400),
        "fb": torch.rand(FEATURES, 257, generator=gen),
        "preemph": 0.97,
        "mag_power": 2.0,
        "log": True,
        "guard_type": "add",
        "guard_value": 2.0**-24,
        "normalize": "per_feature",
        "stft_pad_amount": None,
        "exact_pad": False,
    }


PREPROCESSOR = {"sample_rate": SAMPLE_RATE, "window_size": 0.025, "window_stride": 0.01, "n_fft": 512,
                "features": FEATURES, "normalize": "per_feature"}


def tiny_float_model():
    from qpipe.frontends.torch import from_module

    torch.manual_seed(0)
    fm = from_module(GuardedASR().eval(), (torch.randn(2, FEATURES, 48, generator=torch.Generator().manual_seed(1)),))
    fm.featurizer_state = mel_state()
    fm.preprocessor = dict(PREPROCESSOR)
    fm.vocabulary = list(VOCABULARY)
    fm.kind = "torch:GuardedASR"
    return fm


def write_tiny_folder(out: str, fm=None) -> str:
    """Pipeline + write_folder, without quantize's extras (SQNR, report pages): a second, not ten."""
    from qpipe.backends import SaveRecord, write_folder
    from qpipe.ir.passes import run_pipeline

    fm = fm or tiny_float_model()
    run = run_pipeline(fm.gm, FAST_PIPELINE, state=fm.pipeline_state(), progress=False)
    record = SaveRecord(pipeline=run.pipeline.full_string(), passes=[], source="", kind=fm.kind,
                        preprocessor=fm.preprocessor, vocabulary=fm.vocabulary, time_dim=fm.time_dim,
                        time_multiple=fm.time_multiple, input_shape=list(fm.input_shape),
                        featurizer_state=fm.featurizer_state)
    return write_folder(out, run.gm, record, fm.example_inputs[0], "tiny\n")


_BUILT: dict[str, str] = {}


@pytest.fixture(scope="session")
def quantized_folder(tmp_path_factory) -> str:
    # Each test module that imports this fixture gets its own copy of it; the folder is built once.
    if "folder" not in _BUILT:
        _BUILT["folder"] = write_tiny_folder(str(tmp_path_factory.mktemp("q") / "tiny_int8"))
    return _BUILT["folder"]


def write_wav(path, seconds: float = 0.5, sr: int = SAMPLE_RATE, channels: int = 1, samples: int | None = None) -> str:
    import soundfile as sf

    n = int(round(seconds * sr)) if samples is None else samples
    t = np.arange(n) / sr
    mono = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * np.random.default_rng(0).standard_normal(n)).astype(np.float32)
    data = np.stack([mono] * channels, axis=1) if channels > 1 else mono
    sf.write(str(path), data, sr)
    return str(path)


def fake_nemo(path, config: str | None, members: dict[str, bytes] | None = None) -> str:
    """A tar.gz that looks like a .nemo: model_config.yaml (unless None) plus other members."""
    files = dict(members or {})
    if config is not None:
        files["./model_config.yaml"] = config.encode()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def listing(folder) -> set[str]:
    """Every path under ``folder`` (to check a failed command wrote nothing)."""
    out = set()
    for root, dirs, files in os.walk(folder):
        for n in dirs + files:
            out.add(os.path.relpath(os.path.join(root, n), folder))
    return out
