"""Zero-shot calibration beyond BatchNorm: calibrate-synthetic's targets (ln, ctc, tv) and calibrate-tts.

Tiny graphs only (no NeMo). The espeak-ng tests run the real binary when it is
installed and check the rendered features; without it they skip with the reason,
and the rest of calibrate-tts is tested with a fake espeak-ng on PATH.
"""
from __future__ import annotations

import copy
import io
import os
import shutil
import stat
import struct
import sys
import wave

import numpy as np
import pytest
import torch
from torch.testing import FileCheck

from qpipe.frontends.torch import from_module
from qpipe.ir import QpipeError, print_ir
from qpipe.ir.meta import QPARAMS
from qpipe.ir.passes import run_pipeline
from qpipe.passes import calibrate_synthetic as cs
from qpipe.passes import calibrate_tts as tts

from conftest import TinyASR

FAST = "steps=20,batch=4,length=48,lr=0.05"
INT_TAIL = "substitute-int-ops,fuse-requant,eliminate-dead-float"


class TinyNoBN(torch.nn.Module):
    """TinyASR with its BatchNorm folded away: convs with biases, nothing to match."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pw = torch.nn.Conv1d(8, 12, 3, padding=1)
        self.conv2 = torch.nn.Conv1d(12, 12, 3, padding=1)
        self.head = torch.nn.Conv1d(12, 6, 1)

    def forward(self, x):
        h = torch.relu(self.pw(x))
        return torch.log_softmax(self.head(torch.relu(self.conv2(h))).transpose(1, 2), dim=-1)


class TinyLN(torch.nn.Module):
    """A feed-forward block with LayerNorm (a Conformer's), float only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(8, 16)
        self.ln = torch.nn.LayerNorm(16)
        with torch.no_grad():
            self.ln.weight.copy_(torch.rand(16) + 0.5)
            self.ln.bias.copy_(torch.randn(16) * 0.5)
        self.out = torch.nn.Linear(16, 5)

    def forward(self, x):  # (B, F, T) -> (B, T, V)
        return torch.log_softmax(self.out(self.ln(self.proj(x.transpose(1, 2)))), dim=-1)


def _fm(module):
    return from_module(module.eval(), (torch.randn(2, 8, 32),))


def _run(fm, pipeline, state=None):
    state = state or fm.pipeline_state()
    return run_pipeline(fm.gm, pipeline, state=state, progress=False), state


def _scales(gm):
    return [n.meta[QPARAMS]["scale"] for n in gm.graph.nodes if n.op == "call_module"]


# ------------------------------------------------------------------ calibrate-synthetic targets


def test_default_targets_are_plain_bn_matching(tiny_float_model):
    fm2 = copy.deepcopy(tiny_float_model)
    run1, _ = _run(tiny_float_model, f"fold-bn,insert-observers,calibrate-synthetic{{{FAST}}}")
    run2, _ = _run(fm2, f"fold-bn,insert-observers,calibrate-synthetic{{{FAST},targets=bn}}")
    assert _scales(run1.gm) == _scales(run2.gm)
    assert "targets" not in run1.records[-1].stats  # the default's stats are as before


def test_ctc_targets_calibrate_a_model_without_batchnorm():
    base = _fm(TinyNoBN())
    fresh = lambda: copy.deepcopy(base)  # noqa: E731
    with pytest.raises(QpipeError, match="no BatchNorm statistics.*targets=ctc"):
        _run(fresh(), f"fold-bn,insert-observers,calibrate-synthetic{{{FAST}}}")
    run, state = _run(fresh(), f"fold-bn,insert-observers,calibrate-synthetic{{{FAST},targets=ctc+tv}},{INT_TAIL}")
    st = run.records[2].stats
    assert st["targets"] == "ctc+tv" and st["stat_targets"] == 0
    assert st["kl_last"] < st["kl_first"]  # the CTC + smoothness loss went down
    FileCheck().check("// stage: integer").check("qpipe.quantize").check_not("aten.conv1d").run(print_ir(run.gm))
    assert state.calibration_inputs[0].shape == (4, 8, 48)
    # the same seed, the same scales; another seed, others; auto falls back to ctc+tv
    pipe = f"fold-bn,insert-observers,calibrate-synthetic{{{FAST},targets=ctc+tv}}"
    run_a, _ = _run(fresh(), pipe)
    run_b, _ = _run(fresh(), pipe)
    run_c, _ = _run(fresh(), pipe.replace("}", ",seed=1}"))
    assert _scales(run_a.gm) == _scales(run_b.gm)
    assert _scales(run_a.gm) != _scales(run_c.gm)
    run_d, _ = _run(fresh(), f"fold-bn,insert-observers,calibrate-synthetic{{{FAST},targets=auto}}")
    assert run_d.records[2].stats["targets"] == "ctc+tv"


def test_ctc_term_moves_the_output_toward_the_labels():
    fm = _fm(TinyNoBN())
    run, state = _run(fm, "fold-bn,insert-observers")
    shape = (2, 8, 40)
    x0, _, _ = cs.distill(run.gm, shape, 0, 0.05, 0.3, 0, False, kinds=("ctc",))
    x1, first, last = cs.distill(run.gm, shape, 60, 0.05, 0.3, 0, False, kinds=("ctc",))
    assert last < 0.8 * first
    assert not torch.equal(x0, x1)


def test_random_labels_have_no_blank_and_no_repeat():
    gen = torch.Generator().manual_seed(0)
    lab = cs.random_labels(frames=50, classes=6, batch=3, rate=0.4, gen=gen)
    assert lab.shape == (3, 20)
    assert int(lab.max()) <= 4 and int(lab.min()) >= 0  # class 5 is the blank
    assert bool((lab[:, 1:] != lab[:, :-1]).all())


def test_layer_norm_targets_are_the_affine_parameters():
    module = TinyLN()
    fm = _fm(module)
    targets = cs.layer_norm_targets(fm.gm)
    assert len(targets) == 1
    (t,) = targets.values()
    torch.testing.assert_close(t["mean"], module.ln.bias.detach())
    torch.testing.assert_close(t["std"], module.ln.weight.detach().abs())
    assert cs.parse_targets("auto", fm.gm) == ("ln",)
    assert cs.parse_targets("ctc+bn+ln", fm.gm) == ("bn", "ln", "ctc")
    # distilling toward them lowers the KL of the LayerNorm output's per-channel statistics
    _, first, last = cs.distill(fm.gm, (4, 8, 48), 40, 0.05, 0.3, 0, False, kinds=("ln",))
    assert last < first


def test_target_option_errors(tiny_float_model):
    with pytest.raises(QpipeError, match="targets must be auto or bn"):
        _run(copy.deepcopy(tiny_float_model), "fold-bn,insert-observers,calibrate-synthetic{targets=bn+gauss}")
    with pytest.raises(QpipeError, match="tv alone"):
        _run(copy.deepcopy(tiny_float_model), "fold-bn,insert-observers,calibrate-synthetic{targets=tv}")
    with pytest.raises(QpipeError, match="nothing to match for targets=ln"):
        _run(copy.deepcopy(tiny_float_model), "fold-bn,insert-observers,calibrate-synthetic{targets=ln}")
    with pytest.raises(QpipeError, match="ctc_rate"):
        _run(copy.deepcopy(tiny_float_model), "fold-bn,insert-observers,calibrate-synthetic{targets=ctc,ctc_rate=2.0}")


# ------------------------------------------------------------------ calibrate-tts


def _wav_stream(samples: np.ndarray, rate: int) -> bytes:
    """A WAV the way espeak-ng --stdout writes it: placeholder sizes (it cannot seek back)."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return b"RIFF" + struct.pack("<I", 0x7FFFF024) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt \
        + b"data" + struct.pack("<I", 0x7FFFF000) + pcm


def test_parse_wav_reads_espeak_streams_to_the_end():
    x = np.sin(np.arange(2205) / 7.0).astype(np.float32) * 0.5
    audio, rate = tts.parse_wav(_wav_stream(x, 22050))
    assert rate == 22050 and audio.shape == (2205,)
    np.testing.assert_allclose(audio, x, atol=1 / 16000)
    buf = io.BytesIO()  # an ordinary WAV (exact sizes) reads the same
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes((x * 32767).astype("<i2").tobytes())
    audio2, rate2 = tts.parse_wav(buf.getvalue())
    assert rate2 == 16000 and audio2.shape == (2205,)
    with pytest.raises(QpipeError, match="did not write a WAV"):
        tts.parse_wav(b"espeak: no voice")


def _mel_state(rate: int = 16000, feats: int = 8):
    n_fft = 512
    fb = torch.rand(feats, n_fft // 2 + 1, generator=torch.Generator().manual_seed(0)) * 0.01
    return {"sample_rate": rate, "n_fft": n_fft, "hop_length": 160, "win_length": 400,
            "window": torch.hann_window(400), "fb": fb, "preemph": 0.97, "mag_power": 2.0, "log": True,
            "guard_type": "add", "guard_value": 2**-24, "normalize": "per_feature", "stft_pad_amount": None,
            "exact_pad": False}


def _tts_state(tiny_fm):
    state = tiny_fm.pipeline_state()
    state.featurizer_state = _mel_state()
    state.preprocessor = {"normalize": "per_feature", "sample_rate": 16000}
    return state


@pytest.fixture
def fake_espeak(tmp_path, monkeypatch):
    """An espeak-ng on PATH that writes a streamed WAV of a tone whose length follows the text."""
    script = tmp_path / "espeak-ng"
    script.write_text(f"""#!{sys.executable}
import sys, struct, math
text = sys.argv[-1]
rate = 22050
n = int(0.06 * rate * len(text.split()))
f = 200 + 5 * (sum(map(ord, text)) % 40)
pcm = b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * f * i / rate))) for i in range(n))
fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
sys.stdout.buffer.write(b"RIFF" + struct.pack("<I", 0x7FFFF024) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
                        + b"data" + struct.pack("<I", 0x7FFFF000) + pcm)
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return str(script)


def test_calibrate_tts_with_a_fake_espeak(tiny_float_model, fake_espeak):
    fm2 = copy.deepcopy(tiny_float_model)
    state = _tts_state(tiny_float_model)
    run, _ = _run(tiny_float_model, f"fold-bn,insert-observers,calibrate-tts{{utterances=3}},{INT_TAIL}", state)
    st = run.records[2].stats
    assert st["observers"] == 7 and st["batches"] == 3 and st["audio_seconds"] > 0
    assert [x.shape[1] for x in state.calibration_inputs] == [8, 8, 8]
    FileCheck().check("// stage: integer").run(print_ir(run.gm))
    state2 = _tts_state(fm2)  # same seed: the same utterances, the same features
    run2, _ = _run(fm2, "fold-bn,insert-observers,calibrate-tts{utterances=3}", state2)
    tags = {n.meta[QPARAMS]["calibration"] for n in run2.gm.graph.nodes if n.op == "call_module"}
    assert tags == {"tts:espeak-ng:seed=0"}
    for a, b in zip(state.calibration_inputs, state2.calibration_inputs):
        assert torch.equal(a, b)


def test_calibrate_tts_errors(tiny_float_model, monkeypatch, tmp_path, fake_espeak):
    with pytest.raises(QpipeError, match="calibrate-tts needs espeak-ng, which is not installed"):
        _run(copy.deepcopy(tiny_float_model), "fold-bn,insert-observers,calibrate-tts{espeak=no-such-espeak-ng}",
             _tts_state(tiny_float_model))
    with pytest.raises(QpipeError, match="needs the model's preprocessor"):
        _run(copy.deepcopy(tiny_float_model), "fold-bn,insert-observers,calibrate-tts")  # a plain torch module
    with pytest.raises(QpipeError, match="min_words <= max_words"):
        _run(copy.deepcopy(tiny_float_model), "fold-bn,insert-observers,calibrate-tts{min_words=9,max_words=3}",
             _tts_state(tiny_float_model))


def test_one_line_error_from_the_cli_when_espeak_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    with pytest.raises(QpipeError) as info:
        tts.espeak_binary("espeak-ng")
    assert "\n" not in str(info.value) and "apt-get install espeak-ng" in str(info.value)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_real_espeak_renders_speech_features(tiny_float_model):
    """The real binary: the features vary over time and frequency as speech does (not silence, not constant)."""
    binary = tts.espeak_binary("espeak-ng")
    audio, rate = tts.render(binary, "seven green boats sail across the quiet river", "en-us", 170, 50)
    assert rate > 8000 and len(audio) > 0.8 * rate
    assert float(np.abs(audio).max()) > 0.05
    from qpipe.frontends.mel import MelFeaturizer

    feats = MelFeaturizer(_mel_state())(tts.resample(audio, rate, 16000))
    assert feats.shape[0] == 1 and feats.shape[1] == 8 and feats.shape[2] > 80
    assert float(feats.std(dim=2).min()) > 0.5  # per_feature: every row moves
    energy = feats.mean(dim=1)[0]
    assert float(energy.max() - energy.min()) > 1.0  # loud and quiet frames (words and pauses)
    state = _tts_state(tiny_float_model)
    run, _ = _run(tiny_float_model, "fold-bn,insert-observers,calibrate-tts{utterances=2}", state)
    assert run.records[-1].stats["batches"] == 2
    assert all(float(x.abs().max()) > 1.0 for x in state.calibration_inputs)
