"""Every bad input named in issue 23 and in README.md: one ``qpipe: error:`` line, exit 2,
no traceback, nothing written, and (for ``qpipe MODEL -o OUT``) before the model is loaded.

The commands run in-process (``qpipe.cli.main``) so the table takes seconds: the
errors it checks all come before anything slow. ``load_model`` is replaced by a
function that fails the test, which proves the error came before the model was
loaded. The few inputs that need a real NeMo model are in tests/cli/test_nemo_inputs.py.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile

import pytest

from cli_fixtures import fake_nemo, listing, quantized_folder, write_wav  # noqa: F401  (a fixture)
from conftest import ROOT

CTC_CONFIG = ("target: nemo.collections.asr.models.ctc_models.EncDecCTCModel\n"
              "preprocessor: {sample_rate: 16000, window_size: 0.025, window_stride: 0.01, n_fft: 512, features: 8}\n"
              "encoder: {}\ndecoder: {}\n")
DEMO = os.path.join(ROOT, "models", "demo_quartznet.nemo")


def _ctc(tmp):
    """A .nemo whose config is a supported CTC model (its weights never get read: every case fails first)."""
    return fake_nemo(tmp / "ctc.nemo", CTC_CONFIG)


def _manifest(tmp, lines, name="m.json"):
    path = tmp / name
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else (json.dumps(ln) + "\n").encode()) for ln in lines))
    return str(path)


def _truncated(tmp):
    data = open(DEMO, "rb").read()
    (tmp / "trunc.nemo").write_bytes(data[: len(data) // 3])
    return str(tmp / "trunc.nemo")


def _broken_pass(tmp):
    (tmp / "broken.py").write_text("from qpipe.ir.passes import register\n@register('x'\n")
    return str(tmp / "broken.py")


def _file(tmp, name, data: bytes = b"x"):
    (tmp / name).write_bytes(data)
    return str(tmp / name)


def _folder_with_file(tmp):
    _file(tmp, "afile")
    return str(tmp / "afile" / "out")


def _existing_out(tmp):
    (tmp / "out").mkdir()
    _file(tmp / "out", "keep.txt", b"mine")
    return str(tmp / "out")


# run cases: (id, argv builder, message). {ctc} is a supported .nemo; OUT defaults to tmp/out.
RUN = [
    ("missing-nemo", lambda t: [str(t / "nope.nemo"), "-o", str(t / "out")], "no such file"),
    ("empty-nemo", lambda t: [_file(t, "e.nemo", b""), "-o", str(t / "out")], "is empty (0 bytes)"),
    ("random-bytes-nemo", lambda t: [_file(t, "r.nemo", os.urandom(4096)), "-o", str(t / "out")], "is not a .nemo file"),
    ("truncated-nemo", lambda t: [_truncated(t), "-o", str(t / "out")], "truncated or corrupt"),
    ("nemo-without-config", lambda t: [fake_nemo(t / "nc.nemo", None, {"./model_weights.ckpt": b"w"}), "-o", str(t / "out")],
     "no model_config.yaml inside"),
    ("folder-as-model", lambda t: [str(t), "-o", str(t / "out")], "is a directory"),
    ("rnnt-model", lambda t: [fake_nemo(t / "rnnt.nemo", "target: nemo.collections.asr.models.rnnt_models.EncDecRNNTModel\n"), "-o", str(t / "out")], "RNN-T"),
    ("hybrid-model", lambda t: [fake_nemo(t / "h.nemo", "target: nemo.collections.asr.models.EncDecHybridRNNTCTCModel\n"), "-o", str(t / "out")], "hybrid RNN-T/CTC"),
    ("classification-model", lambda t: [fake_nemo(t / "c.nemo", "target: nemo.collections.asr.models.EncDecClassificationModel\n"), "-o", str(t / "out")], "classification model"),
    ("other-class", lambda t: [fake_nemo(t / "o.nemo", "target: nemo.collections.tts.models.FastPitchModel\n"), "-o", str(t / "out")], "unsupported NeMo model class FastPitchModel"),
    ("unknown-pass", lambda t: [_ctc(t), "--passes", "fold-bnn,insert-observers"], "unknown pass 'fold-bnn'"),
    ("unknown-option", lambda t: [_ctc(t), "--passes", "fold-bn,insert-observers{bits=4}"], "has no option 'bits'"),
    ("option-type", lambda t: [_ctc(t), "--passes", "default,calibrate-synthetic{steps=many}"], "not a valid int"),
    ("bit-width-range", lambda t: [_ctc(t), "--passes", "fold-bn,insert-observers{a_bits=99}"], "a_bits must be in 2..16 (got a_bits=99)"),
    ("steps-range", lambda t: [_ctc(t), "--passes", "fold-bn,insert-observers,calibrate-synthetic{steps=-5}"], "steps must be >= 0 (got steps=-5)"),
    ("length-range", lambda t: [_ctc(t), "--passes", "fold-bn,insert-observers,calibrate-synthetic{length=1}"], "length must be >= 2 (got length=1)"),
    ("lr-range", lambda t: [_ctc(t), "--passes", "fold-bn,insert-observers,calibrate-synthetic{lr=0}"], "lr must be > 0 (got lr=0.0)"),
    ("percentile-range", lambda t: [_ctc(t), "--passes", "fold-bn,insert-observers{act=percentile:20}"], "act must be minmax or percentile:P with P in (50, 100] (got act=percentile:20)"),
    ("choice-option", lambda t: [_ctc(t), "--passes", "fold-bn,insert-observers,calibrate-noise{kind=pink}"], "kind must be one of gaussian, zeros (got kind=pink)"),
    ("path-option-missing", lambda t: [_ctc(t), "--passes", "fold-bn,insert-observers,calibrate-data"], "calibrate-data needs manifest=PATH"),
    ("path-option-no-file", lambda t: [_ctc(t), "--passes", f"fold-bn,insert-observers,calibrate-data{{manifest={t / 'no.json'}}}"], "manifest is not an existing file"),
    ("stages-dont-fit", lambda t: [_ctc(t), "--passes", "fold-bn,calibrate-synthetic"], "stages don't fit"),
    ("unknown-target", lambda t: [_ctc(t), "-o", str(t / "out"), "--target", "tflite"], "tflite"),
    ("existing-out", lambda t: [_ctc(t), "-o", _existing_out(t)], "already exists (use --force"),
    ("out-is-a-file", lambda t: [_ctc(t), "-o", _file(t, "out"), "--force"], "is a file, not a folder"),
    ("out-parent-is-a-file", lambda t: [_ctc(t), "-o", _folder_with_file(t)], "afile is a file, not a folder"),
    ("read-only-out", lambda t: [_ctc(t), "-o", str(t / "ro" / "out")], "read-only file system"),
    ("load-missing", lambda t: [_ctc(t), "--load", str(t / "nope.py")], "--load: no such file"),
    ("load-broken", lambda t: [_ctc(t), "--load", _broken_pass(t)], "SyntaxError"),
    ("dump-dir-under-a-file", lambda t: [_ctc(t), "--dump-dir", os.path.join(_file(t, "f"), "d")], "--dump-dir"),
    ("no-model", lambda t: ["-o", str(t / "out")], "no model given"),
    ("bad-flag", lambda t: [_ctc(t), "--passes"], "expected one argument"),
]


def _read_only(monkeypatch, tmp):
    """What a read-only file system answers (tests run as root, which no chmod stops)."""
    real = tempfile.mkdtemp

    def mkdtemp(*a, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), kw.get("dir"))

    real_mkdir = os.mkdir

    def mkdir(path, *a, **kw):
        if str(path).startswith(str(tmp / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr("qpipe.backends.folder.tempfile.mkdtemp", mkdtemp)
    monkeypatch.setattr("qpipe.backends.folder.os.mkdir", mkdir)
    return real


def _main(argv) -> int:
    """qpipe.cli.main, with argparse's exit (a usage error) as its status."""
    from qpipe.cli import main

    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def _one_error_line(rc: int, err: str, message: str, expected_rc: int = 2) -> None:
    lines = err.strip().splitlines()
    assert rc == expected_rc, err
    assert len(lines) == 1 and lines[0].startswith("qpipe: error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("case, build, message", RUN, ids=[c[0] for c in RUN])
def test_run_bad_input(case, build, message, tmp_path, monkeypatch, capsys):
    from qpipe import api
    from qpipe.cli import main

    def no_loading(*a, **kw):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(api, "load_model", no_loading)
    work = tmp_path / "work"
    work.mkdir()
    argv = build(work)
    if case == "read-only-out":
        _read_only(monkeypatch, work)
    before = listing(tmp_path)
    rc = _main(argv + ["--quiet"])
    out, err = capsys.readouterr()
    _one_error_line(rc, err, message)
    assert listing(tmp_path) == before  # nothing written: no OUT, no temp folder, no parent folder
    if case == "existing-out":
        assert (work / "out" / "keep.txt").read_bytes() == b"mine"


# --------------------------------------------------------------------------- transcribe and eval


def _not_audio(t):
    return _file(t, "noise.wav", os.urandom(2000))


AUDIO = [  # (id, file builder, message, exit code); exit 0: a note line instead of an error
    ("missing", lambda t: str(t / "nope.wav"), "no such audio file", 2),
    ("empty", lambda t: _file(t, "e.wav", b""), "is empty (0 bytes)", 2),
    ("one-sample", lambda t: write_wav(t / "one.wav", samples=1), "audio too short: 0 ms (1 samples", 2),
    ("30-ms", lambda t: write_wav(t / "short.wav", 0.03), "audio too short: 30 ms (480 samples, 3 feature frames); this model needs at least 60 ms (6 frames)", 2),
    ("not-audio", _not_audio, "cannot read audio", 2),
    ("a-folder", lambda t: str(t), "is not an audio file", 2),
    ("8-khz", lambda t: write_wav(t / "8k.wav", 0.5, sr=8000), "qpipe: note: resampling audio from 8000 Hz to the model's 16000 Hz", 0),
    ("stereo", lambda t: write_wav(t / "st.wav", 0.5, channels=2), "qpipe: note: mixing 2 channels down to mono", 0),
]


@pytest.mark.parametrize("case, build, message, rc_expected", AUDIO, ids=[c[0] for c in AUDIO])
def test_transcribe_bad_audio(case, build, message, rc_expected, quantized_folder, tmp_path, capsys):
    from qpipe.cli import main
    from qpipe.frontends.audio import reset_notes

    reset_notes()
    audio = build(tmp_path)
    before = listing(tmp_path)
    rc = main(["transcribe", quantized_folder, audio])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    if rc_expected == 0:
        assert rc == 0 and len(lines) == 1 and lines[0].startswith(message), err
        assert out.startswith(audio + "\t")
    else:
        assert rc == 2 and out == "", (out, err)
        # the file's error, then the tally
        assert len(lines) == 2 and lines[0].startswith("qpipe: error: ") and message in lines[0], err
        assert lines[1] == "qpipe: 1 of 1 files failed"
    assert "Traceback" not in err
    assert listing(tmp_path) == before


def _broken_folder(t, what):
    src = t / "src"
    folder = t / "broken"
    shutil.copytree(src, folder)
    if what == "json":
        (folder / "qpipe.json").write_text("{")
    elif what == "program":
        (folder / "model.pt2").write_bytes(b"not a zip")
    elif what == "missing-program":
        (folder / "model.pt2").unlink()
    elif what == "frontend":
        (folder / "frontend.pt").write_bytes(b"junk")
    return str(folder)


FOLDERS = [
    ("no-folder", lambda t: str(t / "none"), "is not a qpipe output folder"),
    ("corrupt-qpipe-json", lambda t: _broken_folder(t, "json"), "qpipe.json is corrupt"),
    ("missing-model-pt2", lambda t: _broken_folder(t, "missing-program"), "model.pt2 is missing"),
    ("corrupt-model-pt2", lambda t: _broken_folder(t, "program"), "cannot load model.pt2"),
    ("corrupt-frontend", lambda t: _broken_folder(t, "frontend"), "frontend.pt is corrupt"),
]


@pytest.mark.parametrize("case, build, message", FOLDERS, ids=[c[0] for c in FOLDERS])
def test_transcribe_bad_folder(case, build, message, quantized_folder, tmp_path, capsys):
    from qpipe.cli import main

    shutil.copytree(quantized_folder, tmp_path / "src")
    wav = write_wav(tmp_path / "ok.wav", 0.5)
    folder = build(tmp_path)
    before = listing(tmp_path)
    rc = main(["transcribe", folder, wav])
    out, err = capsys.readouterr()
    _one_error_line(rc, err, message)
    assert out == "" and listing(tmp_path) == before


MANIFESTS = [  # (id, manifest lines (dicts or raw bytes), message)
    ("not-json-lines", [{"audio_filepath": "ok.wav", "text": "a"}, b'{"audio_filepath": \n'], "m.json:2: not JSON"),
    ("empty", [b"\n"], "is empty (no JSON lines)"),
    ("no-audio-field", [{"text": "a"}], "m.json:1: entry has no audio_filepath"),
    ("missing-audio", [{"audio_filepath": "nope.wav", "text": "a"}], "entry 1: no such audio file"),
    ("not-utf8", [{"audio_filepath": "ok.wav", "text": "a"}, b'{"audio_filepath": "ok.wav", "text": "caf\xe9"}\n'], "m.json:2: not UTF-8 text (byte 0xe9"),
    ("not-audio", [{"audio_filepath": "noise.wav", "text": "a"}], "entry 1: cannot read audio"),
    ("empty-audio", [{"audio_filepath": "e.wav", "text": "a"}], "entry 1: audio file"),
    ("30-ms-audio", [{"audio_filepath": "ok.wav", "text": "a"}, {"audio_filepath": "short.wav", "text": "a"}],
     "entry 2: " ),
]


@pytest.mark.parametrize("case, lines, message", MANIFESTS, ids=[c[0] for c in MANIFESTS])
def test_eval_bad_manifest(case, lines, message, quantized_folder, tmp_path, capsys):
    from qpipe.cli import main

    write_wav(tmp_path / "ok.wav", 0.5)
    write_wav(tmp_path / "short.wav", 0.03)
    _file(tmp_path, "noise.wav", os.urandom(2000))
    _file(tmp_path, "e.wav", b"")
    manifest = _manifest(tmp_path, lines)
    before = listing(tmp_path)
    rc = main(["eval", quantized_folder, "--manifest", manifest, "--json", str(tmp_path / "r.json"), "--quiet"])
    out, err = capsys.readouterr()
    _one_error_line(rc, err, message)
    if case == "30-ms-audio":
        assert "audio too short: 30 ms" in err and "needs at least 60 ms (6 frames)" in err
    assert listing(tmp_path) == before  # no r.json


def test_eval_short_audio_with_a_float_model_fails_before_loading_it(quantized_folder, tmp_path, capsys, monkeypatch):
    """With the float .nemo in the comparison, the same minimum applies, found before NeMo restores anything."""
    import qpipe.asr.evaluate as ev
    from qpipe.cli import main

    monkeypatch.setattr(ev, "_float_candidate", lambda p: (_ for _ in ()).throw(AssertionError("loaded the float model")))
    write_wav(tmp_path / "short.wav", 0.03)
    manifest = _manifest(tmp_path, [{"audio_filepath": "short.wav", "text": "a"}])
    rc = main(["eval", _ctc(tmp_path), quantized_folder, "--manifest", manifest, "--quiet"])
    _one_error_line(rc, capsys.readouterr().err, "short.wav: audio too short: 30 ms")


@pytest.mark.slow
def test_read_only_file_system_for_real(tmp_path):
    """The read-only case on a real read-only mount (a private mount namespace; skipped where unshare is not allowed)."""
    import subprocess
    import sys

    ro = tmp_path / "ro"
    ro.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {ro}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no private mount namespace here (unshare -m / mount not permitted)")
    qpipe = f"{sys.executable} {os.path.join(ROOT, 'tools', 'qpipe')}"
    cmd = f"mount -t tmpfs -o ro tmpfs {ro} && {qpipe} {DEMO} -o {ro / 'out'} --quiet"
    proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, timeout=300)
    _one_error_line(proc.returncode, proc.stderr, f"cannot write {ro / 'out'}: read-only file system ({ro})")
    assert proc.stdout == ""
