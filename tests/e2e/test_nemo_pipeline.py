"""End to end on NeMo models built from their configs (and the bundled demo QuartzNet): CLI, artifact, reload, transcribe."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch
from torch.testing import FileCheck

from conftest import FAST_CALIBRATION, FAST_PIPELINE, ROOT

pytestmark = pytest.mark.nemo
QPIPE = [sys.executable, os.path.join(ROOT, "tools", "qpipe")]


def run_cli(*args, check=True):
    proc = subprocess.run(QPIPE + [str(a) for a in args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"qpipe {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_cli_quantizes_saves_reloads_and_transcribes(nemo_tiny_path, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(nemo_tiny_path, "--passes", FAST_PIPELINE, "-o", out, "--quiet")
    assert "eliminate-dead-float" in proc.stdout and f"wrote {out}" in proc.stdout
    assert sorted(os.listdir(out)) == ["frontend.pt", "ir.txt", "model.pt2", "qpipe.json", "report.html", "report.txt"]
    meta = json.loads((out / "qpipe.json").read_text())
    # the pipeline that ran, every option written out: FAST_PIPELINE's passes in its order, and it re-parses to itself
    from qpipe.ir.passes import parse_pipeline

    recorded = parse_pipeline(meta["pipeline"])
    assert [s.spec.name for s in recorded.steps] == [s.spec.name for s in parse_pipeline(FAST_PIPELINE).steps] == [
        "fold-bn", "insert-observers", "calibrate-synthetic", "substitute-int-ops", "fuse-requant", "eliminate-dead-float"]
    assert recorded.full_string() == meta["pipeline"] == parse_pipeline(FAST_PIPELINE).full_string()
    calib = {k: str(v) for k, v in recorded.steps[2].options.items()}  # every option is recorded, the given ones as given
    assert {k: calib[k] for k in ("batch", "batches", "length", "seed", "steps")} == {
        "batch": "4", "batches": "1", "length": "48", "seed": "0", "steps": "20"}
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["vocabulary"][0] == " " and len(meta["vocabulary"]) == 28
    assert meta["outputs"][0]["bits"] == 16
    assert meta["metrics"]["logprob_sqnr_db"] > 20
    # the printed integer IR: an input quantizer, then qpipe ops only
    FileCheck().check("qpipe.quantize(%features").check("qpipe.conv1d_rq").check("qpipe.add_requant") \
        .check_not("aten.conv1d").check_not("aten.relu").check_not("aten.add").check_not("f32[").check("return").run((out / "ir.txt").read_text())

    from qpipe.backends import open_folder

    qm = open_folder(str(out))
    x = torch.randn(1, 64, 123)
    logits = qm.logits_int(x)
    assert logits.dtype == torch.int16 and logits.shape[0] == 1 and logits.shape[2] == 29

    espeak = shutil.which("espeak-ng")
    if espeak:
        wav = tmp_path / "hello.wav"
        subprocess.run([espeak, "-w", str(wav), "hello world"], check=True)
        proc = run_cli("transcribe", out, wav)
        # random weights: the words mean nothing (the demo-model test below checks words), but the CLI
        # prints one "path<TAB>text" line, text from the vocabulary, the same text as the API gives
        path, text = proc.stdout.rstrip("\n").split("\t")
        assert path == str(wav) and "\n" not in proc.stdout.rstrip("\n")
        assert set(text) <= set(meta["vocabulary"])
        # the saved front end transcribes without importing NeMo
        code = (f"import sys, json, qpipe.api as qp; t = qp.transcribe({str(out)!r}, [{str(wav)!r}]); "
                "print(json.dumps(t)); print('nemo' in sys.modules)")
        check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
        lines = check.stdout.strip().splitlines()
        assert lines[-1] == "False", check.stderr[-2000:]
        assert json.loads(lines[-2]) == [text]

    insp = run_cli("inspect", out, "--json", tmp_path / "inspect.json")
    assert "conv1d_rq" in insp.stdout
    table = json.loads((tmp_path / "inspect.json").read_text())
    sats = [r["saturation"] for r in table["layers"] if isinstance(r["saturation"], float)]
    assert sats and all(0 <= s <= 1 for s in sats)


def test_custom_pass_from_file_dump_dir_and_diff_between_stages(nemo_tiny_path, tmp_path):
    """One CLI run (a NeMo import and a calibration cost about 15 s each time): a user pass loaded from a file,
    every stage's IR dumped and printed, and `qpipe diff` between two of the dumps."""
    example = os.path.join(ROOT, "examples", "set_bits.py")
    pipeline = FAST_PIPELINE.replace("insert-observers,", "insert-observers,set-bits{match=encoder.1,bits=6},")
    dump = tmp_path / "dump"
    proc = run_cli(nemo_tiny_path, "--load", example, "--passes", pipeline, "--print-after-all", "--dump-dir", dump, "--quiet")
    assert "set-bits" in proc.stdout and "changed=" in proc.stdout
    FileCheck().check("IR after set-bits").check("bits=6").check("IR after fuse-requant").check("qpipe.conv1d_rq").check("lo=-32, hi=31, bits=6, f32=true)").run(proc.stdout)
    names = sorted(os.listdir(dump))
    assert names[0] == "000_input.txt" and names[3] == "003_set-bits.txt" and names[-1] == "007_eliminate-dead-float.txt"
    assert "bits=6" not in (dump / "002_insert-observers.txt").read_text() and "bits=6" in (dump / "003_set-bits.txt").read_text()
    proc = run_cli("diff", dump / "005_substitute-int-ops.txt", dump / "006_fuse-requant.txt", "--json", tmp_path / "d.json")
    d = json.loads((tmp_path / "d.json").read_text())
    assert any(r["op"] == "qpipe.conv1d_rq" for r in d["added"])
    assert any(r["op"] == "qpipe.requant" for r in d["removed"])
    assert "added" in proc.stdout
    listed = run_cli("--load", example, "--list-passes")
    assert "set-bits" in listed.stdout


def _fake_nemo(path, target):
    cfg = f"target: {target}\nencoder: {{}}\ndecoder: {{}}\n".encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("./model_config.yaml")
        info.size = len(cfg)
        tar.addfile(info, io.BytesIO(cfg))


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such file"),
        ("not_nemo", "is not a .nemo file"),
        ("rnnt", "RNN-T"),
        ("bad_pass", "unknown pass 'fold-bnn'"),
        ("bad_stages", "stages don't fit"),
        ("bad_option", "has no option"),
    ],
)
def test_bad_input_one_line_error_and_nothing_written(case, message, tmp_path, nemo_tiny_path):
    out = tmp_path / "out"
    model, passes = nemo_tiny_path, "default"
    if case == "missing":
        model = tmp_path / "nope.nemo"
    elif case == "not_nemo":
        model = tmp_path / "notes.nemo"
        model.write_text("just text")
    elif case == "rnnt":
        model = tmp_path / "rnnt.nemo"
        _fake_nemo(model, "nemo.collections.asr.models.rnnt_models.EncDecRNNTModel")
    elif case == "bad_pass":
        passes = "fold-bnn,insert-observers"
    elif case == "bad_stages":
        passes = "fold-bn,calibrate-synthetic"
    elif case == "bad_option":
        passes = "fold-bn,insert-observers{bits=4}"
    proc = run_cli(model, "--passes", passes, "-o", out, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("qpipe: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".qpipe-tmp")]


def test_existing_output_is_not_overwritten(nemo_tiny_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli(nemo_tiny_path, "-o", out, check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_quartznet_15x5_goes_integer_only(quartznet_15x5_torch_int8):
    """NeMo's QuartzNet 15x5 config (random weights, non-default BN): zero float ops after the quantizer."""
    from qpipe.ir import print_ir
    from qpipe.ir.verifier import integer_region, integer_violations

    result, _ = quartznet_15x5_torch_int8
    float_convs = sum(1 for n in result.float_gm.graph.nodes if "conv1d" in str(n.target))
    assert float_convs == 171
    assert integer_violations(result.gm) == []
    text = print_ir(result.gm, include_params=False)
    body = text.split("qpipe.quantize(", 1)[1]
    FileCheck().check_count("qpipe.conv1d_rq", float_convs, exactly=True).check_not("f32[").check_not("aten.conv").run(body)
    for line in body.splitlines()[1:]:
        if line.startswith("%"):  # every op is a qpipe integer op or a view of integers
            assert " = qpipe." in line or (" = aten.transpose" in line and ": i16[" in line), line
    FileCheck().check_count("qpipe.add_requant", 15, exactly=True).run(body)
    assert len(integer_region(result.gm)) > float_convs
    assert result.run.records[-1].stats["float_ops"] == 0


# Sentences of the demo models' domain (Debian fortunes; the demo LM holds every 3-gram of all
# but the first), spoken by an espeak-ng voice of the training mix (en-us+m3, default speed).
# Measured 2026-12 with espeak-ng 1.51, quantized default pipeline: 14 word errors in 49 words
# (WER 28.6 %, CER 8.4 %), 35 of the 49 words in order; en-us, en-us+m1 and en-gb+m1 give
# 32.7-36.7 % WER, 8.8-9.2 % CER.  The same transcripts against each other's sentences (the
# references rotated by one) score 108 % WER, 84.5 % CER and 3 words in order.
SPOKEN = [
    "the best way to predict the future is to invent it",
    "if at first you don't succeed try try again",
    "there is no time like the present",
    "life is what happens to you while you're busy making other plans",
    "never put off till tomorrow what you can do today",
]
WER_BOUND = 0.50
CER_BOUND = 0.20
MIN_WORDS_IN_ORDER = 25  # of 49


def _edits(ref, hyp) -> int:
    """Levenshtein distance between two sequences (words or characters)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def _in_order(ref, hyp) -> int:
    """How many of ref's words hyp has in the same order (longest common subsequence)."""
    row = [0] * (len(hyp) + 1)
    for r in ref:
        prev = 0
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], prev + 1 if r == h else max(row[j], row[j - 1])
    return row[-1]


def _scores(refs, hyps):
    words = sum(len(r.split()) for r in refs)
    return {
        "wer": sum(_edits(r.split(), h.split()) for r, h in zip(refs, hyps)) / words,
        "cer": sum(_edits(r, h) for r, h in zip(refs, hyps)) / sum(len(r) for r in refs),
        "in_order": sum(_in_order(r.split(), h.split()) for r, h in zip(refs, hyps)),
    }


@pytest.mark.slow
def test_demo_quartznet_int8_transcribes_spoken_sentences(tmp_path):
    """espeak-ng speaks known sentences; the integer demo QuartzNet gets most of their words."""
    espeak = shutil.which("espeak-ng")
    if not espeak:
        pytest.skip("espeak-ng is not installed")
    from qpipe.api import quantize, transcribe

    out = tmp_path / "demo_int8"
    quantize(os.path.join(ROOT, "models", "demo_quartznet.nemo"), passes="default", output=str(out), progress=False)
    wavs = []
    for i, sentence in enumerate(SPOKEN):
        wavs.append(str(tmp_path / f"{i}.wav"))
        subprocess.run([espeak, "-v", "en-us+m3", "-w", wavs[-1], sentence], check=True)
    hyps = transcribe(str(out), wavs)
    got = _scores(SPOKEN, hyps)
    shown = "\n".join(f"  {r!r} -> {h!r}" for r, h in zip(SPOKEN, hyps))
    assert got["wer"] <= WER_BOUND and got["cer"] <= CER_BOUND, f"{got}\n{shown}"
    assert got["in_order"] >= MIN_WORDS_IN_ORDER, f"{got}\n{shown}"
    # the bounds tell sentences apart: against the wrong sentences, the same transcripts fail them all
    wrong = _scores(SPOKEN[1:] + SPOKEN[:1], hyps)
    assert wrong["wer"] > 2 * WER_BOUND and wrong["cer"] > 3 * CER_BOUND and wrong["in_order"] < MIN_WORDS_IN_ORDER / 3, wrong
