"""qpipe eval: text normalization, corpus-level WER/CER, errors, and an end-to-end run on a tiny QuartzNet."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

try:
    import qpipe  # noqa: F401
except ImportError:  # run without the lead's conftest: put the checkout on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from qpipe.asr.evaluate import (  # noqa: E402
    ErrorCounts,
    corpus_counts,
    error_counts,
    normalize_text,
    selected_utterances,
    write_json_atomic,
)

FAST = "fold-bn,insert-observers,calibrate-synthetic{steps=5,batch=2,length=64},substitute-int-ops,fuse-requant,eliminate-dead-float"


# --------------------------------------------------------------------------- normalization


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Hello, World!", "hello world"),
        ("  the   QUICK\tbrown\n fox ", "the quick brown fox"),
        ("don't stop", "don't stop"),
        ("don\u2019t stop", "don't stop"),  # typographic apostrophe
        ("twenty-one", "twenty one"),
        ('"Quoted" (text); and: more...', "quoted text and more"),
        ("Mr. Smith?!", "mr smith"),
        ("ÉCOLE Über", "école über"),
        ("", ""),
        ("...", ""),
    ],
)
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


def test_normalize_text_is_idempotent():
    for s in ("Hello, World!", "don\u2019t -- stop", "A.B.C."):
        assert normalize_text(normalize_text(s)) == normalize_text(s)


# --------------------------------------------------------------------------- counts and rates


def test_error_counts_one_utterance():
    c = error_counts("the cat sat", "the cat sad")
    assert (c.word_edits, c.ref_words) == (1, 3)
    assert (c.char_edits, c.ref_chars) == (1, 11)  # characters count spaces
    assert c.wer == pytest.approx(1 / 3)
    assert c.cer == pytest.approx(1 / 11)


def test_error_counts_normalizes_both_sides():
    c = error_counts("The Cat, sat.", "the cat sat")
    assert c.word_edits == 0 and c.char_edits == 0 and c.wer == 0.0


def test_error_counts_insertions_and_deletions():
    assert error_counts("a b c", "a b c d").word_edits == 1  # insertion
    assert error_counts("a b c", "").word_edits == 3  # empty hypothesis: all deleted
    c = error_counts("", "x y")  # empty reference: insertions, rate undefined
    assert (c.word_edits, c.ref_words) == (2, 0) and c.wer is None
    assert error_counts("", "").wer == 0.0


def test_corpus_wer_is_total_edits_over_total_words_not_mean():
    refs = ["a", "a b c d e f g h i j"]  # 1 word, 10 words
    hyps = ["b", "a b c d e f g h i j"]  # 1 error, 0 errors
    per = [error_counts(r, h) for r, h in zip(refs, hyps)]
    total = corpus_counts(per)
    assert (total.word_edits, total.ref_words) == (1, 11)
    assert total.wer == pytest.approx(1 / 11)
    mean = sum(c.wer for c in per) / len(per)
    assert mean == pytest.approx(0.5) and not math.isclose(total.wer, mean)
    # characters likewise: 1 substituted char of 1 + 19
    assert (total.char_edits, total.ref_chars) == (1, 20)
    assert total.cer == pytest.approx(1 / 20)


def test_corpus_counts_empty_and_sum():
    assert corpus_counts([]) == ErrorCounts()
    assert corpus_counts([]).wer == 0.0
    assert ErrorCounts(1, 2, 3, 4) + ErrorCounts(1, 1, 1, 1) == ErrorCounts(2, 3, 4, 5)


def test_selected_utterances():
    result = {
        "per_utterance": [
            {"index": 0, "reference": "a b", "hypotheses": {"float": "a b", "q": "a b"}},
            {"index": 1, "reference": "a b", "hypotheses": {"float": "a b", "q": "a c"}},
            {"index": 2, "reference": "a b", "hypotheses": {"float": "x", "q": "x"}},
        ]
    }
    assert [u["index"] for u in selected_utterances(result, only_differences=True)] == [1]
    assert [u["index"] for u in selected_utterances(result, only_differences=False)] == [0, 1, 2]
    one = {"per_utterance": [{"index": 0, "reference": "a", "hypotheses": {"q": "a"}}, {"index": 1, "reference": "a", "hypotheses": {"q": "b"}}]}
    assert [u["index"] for u in selected_utterances(one, only_differences=True)] == [1]


def test_write_json_atomic(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    write_json_atomic(str(path), {"wer": 1.5})
    assert json.loads(path.read_text()) == {"wer": 1.5}
    with pytest.raises(ValueError):
        write_json_atomic(str(path), {"wer": float("inf")})  # not valid JSON: refused, old file kept
    assert json.loads(path.read_text()) == {"wer": 1.5}
    assert sorted(os.listdir(tmp_path)) == ["r.json"]  # no temp file left behind


# --------------------------------------------------------------------------- errors (no NeMo needed)


def _cli(argv, capsys):
    from qpipe.cli import main

    rc = main(["eval", *argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def _wav(path, seconds=0.5, sr=16000):
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr)
    return str(path)


def test_errors_are_one_line(tmp_path, capsys):
    fake = tmp_path / "model.nemo"
    fake.write_text("not a tar archive")
    _wav(tmp_path / "a.wav")
    good = tmp_path / "m.json"
    good.write_text(json.dumps({"audio_filepath": "a.wav", "duration": 0.5, "text": "a"}) + "\n")
    bad = tmp_path / "bad.json"
    bad.write_text('{"audio_filepath": "a.wav", "text": "a"}\n{"audio_filepath": \n')
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"audio_filepath": "nope.wav", "text": "a"}) + "\n")
    cases = [
        ([str(fake), "--manifest", str(tmp_path / "none.json")], "no such manifest"),
        ([str(fake), "--manifest", str(bad)], "bad.json:2: not JSON"),
        ([str(fake), "--manifest", str(missing)], "no such audio file"),
        ([str(fake), "--manifest", str(good)], "is not a .nemo file"),
        ([str(tmp_path / "none.nemo"), "--manifest", str(good)], "no such file"),
        ([str(tmp_path), "--manifest", str(good)], "neither a .nemo model nor a qpipe output folder"),
        ([str(fake), str(tmp_path / "no_out"), "--manifest", str(good)], "no such output folder"),
        ([str(fake), str(fake), "--manifest", str(good)], "only the first argument may be a .nemo"),
        ([str(fake), "--manifest", str(good), "--json", str(tmp_path / "no" / "r.json")], "does not exist"),
    ]
    for argv, needle in cases:
        rc, err = _cli(argv, capsys)
        assert rc == 2, (argv, err)
        assert err.startswith("qpipe: error: ") and needle in err, (argv, err)
        assert len(err.splitlines()) == 1, err


# --------------------------------------------------------------------------- end to end


def _espeak_manifest(folder, texts):
    espeak = shutil.which("espeak-ng") or ("/usr/bin/espeak-ng" if os.path.exists("/usr/bin/espeak-ng") else None)
    if espeak is None:
        pytest.skip("espeak-ng is not installed")
    os.makedirs(folder / "wav", exist_ok=True)
    lines = []
    for i, text in enumerate(texts):
        wav = folder / "wav" / f"u{i}.wav"
        subprocess.run([espeak, "-w", str(wav), text], check=True, capture_output=True)
        # espeak-ng writes 22.05 kHz; load_audio resamples to the model's 16 kHz
        lines.append(json.dumps({"audio_filepath": f"wav/u{i}.wav", "duration": 1.0, "text": text}))
    manifest = folder / "manifest.json"
    manifest.write_text("\n".join(lines) + "\n")
    return str(manifest)


@pytest.fixture(scope="module")
def tiny_quantized(tmp_path_factory):
    pytest.importorskip("nemo")
    from qpipe.api import quantize
    from qpipe.frontends.nemo_configs import build_random_nemo

    folder = tmp_path_factory.mktemp("eval")
    nemo = build_random_nemo("quartznet_tiny", str(folder / "tiny.nemo"), seed=3)
    out = str(folder / "out_int8")
    quantize(nemo, passes=FAST, output=out, progress=False)
    return nemo, out, folder


@pytest.mark.nemo
@pytest.mark.slow
def test_eval_float_and_quantized(tiny_quantized, capsys):
    nemo, out, folder = tiny_quantized
    texts = ["Hello, world!", "the quick brown fox", "Don't panic."]
    manifest = _espeak_manifest(folder, texts)
    report = str(folder / "eval.json")
    from qpipe.asr.evaluate import main

    assert main([nemo, out, "--manifest", manifest, "--json", report, "--per-utterance", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "WER %" in printed and "tiny.nemo" in printed and "out_int8" in printed
    assert "the quick brown fox" in printed and "don't panic" in printed  # per-utterance references, normalized

    result = json.loads(open(report).read())
    assert result["utterances"] == len(texts)
    assert result["audio_seconds"] > 0
    rows = {r["kind"]: r for r in result["models"]}
    assert set(rows) == {"float", "quantized"} and len(result["models"]) == 2
    for r in result["models"]:
        assert r["utterances"] == len(texts)
        for key in ("wer", "cer", "rtf"):
            assert isinstance(r[key], float) and 0 <= r[key] < math.inf, (key, r)
        assert r["reference_words"] == 2 + 4 + 2
        assert r["wer"] == pytest.approx(100 * r["word_errors"] / r["reference_words"])
    assert rows["float"]["delta_wer"] is None
    assert rows["quantized"]["delta_wer"] == pytest.approx(rows["quantized"]["wer"] - rows["float"]["wer"])
    assert len(result["per_utterance"]) == len(texts)
    assert result["per_utterance"][0]["reference"] == "hello world"
    assert set(result["per_utterance"][0]["hypotheses"]) == {"tiny.nemo", "out_int8"}


@pytest.mark.nemo
@pytest.mark.slow
def test_eval_outputs_only_limit_and_other_preprocessor(tiny_quantized, capsys):
    nemo, out, folder = tiny_quantized
    manifest = _espeak_manifest(folder / "b", ["one two", "three"])
    other = str(folder / "out_other_pre")
    if not os.path.exists(other):
        shutil.copytree(out, other)
        meta_path = os.path.join(other, "qpipe.json")
        meta = json.load(open(meta_path))
        meta["preprocessor"]["window_size"] = 0.025
        json.dump(meta, open(meta_path, "w"))
    report = str(folder / "b" / "eval.json")
    from qpipe.asr.evaluate import main

    assert main([out, other, "--manifest", manifest, "--limit", "1", "--json", report, "--diffs", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "different preprocessor" in captured.err
    result = json.load(open(report))
    assert result["utterances"] == 1
    assert [r["kind"] for r in result["models"]] == ["quantized", "quantized"]
    assert all(r["delta_wer"] is None and r["utterances"] == 1 for r in result["models"])


@pytest.mark.nemo
@pytest.mark.slow
def test_eval_with_a_word_lm(tiny_quantized, capsys):
    nemo, out, folder = tiny_quantized
    texts = ["one two", "three four"]
    manifest = _espeak_manifest(folder / "lm", texts)
    lm = str(folder / "lm" / "lm.arpa")
    from qpipe.cli import main as cli

    assert cli(["lm", manifest, "-o", lm, "--order", "2"]) == 0
    report = str(folder / "lm" / "eval.json")
    assert cli(["eval", nemo, out, "--manifest", manifest, "--lm", lm, "--beam", "4", "--json", report, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "CTC beam search (beam 4) with the 2-gram word LM lm.arpa" in " ".join(printed.split())
    result = json.load(open(report))
    assert result["decoding"] == {"method": "beam", "beam_width": 4, "lm": lm, "lm_order": 2, "alpha": 0.8, "beta": 1.5}
    assert all(r["utterances"] == 2 for r in result["models"])
    wav = str(folder / "lm" / "wav" / "u0.wav")
    assert cli(["transcribe", out, wav, "--lm", lm, "--beam", "4"]) == 0
    assert capsys.readouterr().out.startswith(f"{wav}\t")
    # a broken LM fails in one line, before any model runs
    bad = folder / "lm" / "bad.arpa"
    bad.write_text("not an lm\n")
    rc, err = _cli([nemo, "--manifest", manifest, "--lm", str(bad)], capsys)
    assert rc == 2 and err == f"qpipe: error: {bad}:1: not an ARPA language model (expected \\data\\ first)"


def test_decoding_describes_itself():
    import torch

    from qpipe.asr.decode import Decoding

    assert Decoding().describe() == {"method": "greedy"}
    assert Decoding(beam_width=8).describe() == {"method": "beam", "beam_width": 8}
    assert Decoding().decoder_for(["a"])(torch.tensor([[[0.0, -9.0], [-9.0, 0.0]]])) == "a"
