"""qpipe.asr.lm: Kneser-Ney n-gram LMs, exact normalization, ARPA round trip, clear errors."""
from __future__ import annotations

import gzip
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpipe.ir.errors import QpipeError
from qpipe.asr.lm import BOS, EOS, UNK, build_kneser_ney, read_arpa, read_sentences, write_arpa

WORDS = ["a", "b", "c", "dd", "e'f"]
sentences = st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join), min_size=1, max_size=12)


def _total(lm, context):
    """Sum of P(w | context) over everything the model can predict."""
    return sum(math.exp(lm.score(context, w)) for w in sorted(lm.vocabulary | {UNK, EOS}))


@settings(max_examples=40, deadline=None)
@given(sentences, st.integers(1, 4), st.lists(st.sampled_from(WORDS + ["zz", BOS]), max_size=3))
def test_every_context_is_a_distribution(text, order, context):
    lm = build_kneser_ney(text, order)
    assert _total(lm, context) == pytest.approx(1.0, abs=1e-9)


@settings(max_examples=25, deadline=None)
@given(sentences, st.integers(1, 3))
def test_arpa_round_trip_keeps_sentence_scores(tmp_path_factory, text, order):
    lm = build_kneser_ney(text, order)
    path = str(tmp_path_factory.mktemp("arpa") / "lm.arpa")
    write_arpa(lm, path)
    back = read_arpa(path)
    assert back.order == order and back.counts() == lm.counts()
    for s in text + ["zz a", "e'f e'f e'f"]:
        assert back.sentence_logprob(s.split()) == pytest.approx(lm.sentence_logprob(s.split()), abs=1e-4)


def test_seen_continuations_beat_unseen_and_unknown_words_score_as_unk():
    lm = build_kneser_ney(["the cat sat", "the cat ran", "a dog sat"], order=3)
    assert lm.score([BOS, "the"], "cat") > lm.score([BOS, "the"], "dog")
    assert lm.score(["the"], "zebra") == lm.score(["the"], UNK)
    assert lm.score(["zebra"], "cat") == pytest.approx(lm.score([UNK], "cat"))
    assert "ca" in lm.word_prefixes and "" in lm.word_prefixes and "cx" not in lm.word_prefixes


def test_text_is_normalized_like_eval(tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_text('{"audio_filepath": "x.wav", "text": "Don\'t PANIC!"}\n\n')
    plain = tmp_path / "t.txt.gz"
    with gzip.open(plain, "wt") as f:
        f.write("Hello, world.\n")
    assert read_sentences([str(manifest), str(plain)]) == ["don't panic", "hello world"]
    assert "don't" in build_kneser_ney(read_sentences([str(manifest)]), 2).vocabulary


def test_gzip_arpa_and_errors(tmp_path):
    lm = build_kneser_ney(["one two three"], 2)
    path = tmp_path / "lm.arpa.gz"
    write_arpa(lm, str(path))
    assert read_arpa(str(path)).counts() == lm.counts()
    first = path.read_bytes()
    write_arpa(lm, str(path))
    assert path.read_bytes() == first  # no time stamp or temp name in the gzip header
    with pytest.raises(QpipeError, match="no such language model"):
        read_arpa(str(tmp_path / "none.arpa"))
    truncated = tmp_path / "cut.arpa"
    truncated.write_text("\n".join(gzip.open(path, "rt").read().splitlines()[:8]) + "\n")
    with pytest.raises(QpipeError, match="truncated"):
        read_arpa(str(truncated))
    (tmp_path / "junk.arpa").write_text("hello\n")
    with pytest.raises(QpipeError, match="not an ARPA"):
        read_arpa(str(tmp_path / "junk.arpa"))
    with pytest.raises(QpipeError, match="no text"):
        build_kneser_ney(["", "!!"], 2)
    with pytest.raises(QpipeError, match="does not exist"):
        write_arpa(lm, str(tmp_path / "no" / "lm.arpa"))
    assert not list(tmp_path.glob(".qpipe-lm-*"))


def test_cli_builds_an_lm_and_excludes_test_sentences(tmp_path, capsys):
    from qpipe.cli import main

    train = tmp_path / "train.txt"
    train.write_text("the cat sat\nthe dog ran\nheld out sentence\n")
    test = tmp_path / "test.txt"
    test.write_text("Held out sentence.\n")
    out = tmp_path / "lm.arpa"
    assert main(["lm", str(train), "-o", str(out), "--order", "2", "--exclude", str(test)]) == 0
    assert "2 distinct sentences" in capsys.readouterr().out
    assert "held" not in read_arpa(str(out)).vocabulary
    assert main(["lm", str(tmp_path / "none.txt"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"qpipe: error: no such text file: {tmp_path / 'none.txt'}"
