"""qpipe.asr.decode.BeamSearchDecoder against exhaustive CTC path sums and greedy decoding."""
from __future__ import annotations

import itertools
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpipe.asr.decode import BeamSearchDecoder, greedy_ctc
from qpipe.asr.lm import build_kneser_ney


def _collapse(path, vocab, blank):
    out, prev = [], None
    for t in path:
        if t != prev and t != blank:
            out.append(vocab[t])
        prev = t
    return "".join(out)


def _labeling_probs(logp: torch.Tensor, vocab: list[str]) -> dict[str, float]:
    """P(labeling) by summing every CTC path: exact, exponential, tiny inputs only."""
    T, V = logp.shape
    probs: dict[str, float] = {}
    for path in itertools.product(range(V), repeat=T):
        p = math.exp(sum(float(logp[t, k]) for t, k in enumerate(path)))
        text = _collapse(path, vocab, V - 1)
        probs[text] = probs.get(text, 0.0) + p
    return probs


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 2), st.integers(0, 10_000))
def test_wide_beam_finds_the_most_probable_labeling(T, n_labels, seed):
    vocab = ["a", "b"][:n_labels]
    gen = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(T, n_labels + 1, generator=gen) * 2, dim=-1)
    probs = _labeling_probs(logp, vocab)
    best = max(probs.values())
    dec = BeamSearchDecoder(vocab, beam_width=10_000, token_beam=math.inf)
    assert probs[dec(logp)] >= best * (1 - 1e-9)


def test_beam_search_beats_greedy_where_paths_add_up():
    # Each frame: blank 0.6, "a" 0.4. Greedy reads "", but P("a") = 1 - 0.6^2 = 0.64.
    logp = torch.log(torch.tensor([[0.4, 0.6], [0.4, 0.6]]))
    assert greedy_ctc(logp[None], ["a"])[0] == ""
    assert BeamSearchDecoder(["a"])(logp) == "a"


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=30))
def test_confident_frames_decode_like_greedy(ids):
    vocab = [" ", "a", "b"]
    logits = torch.full((len(ids), 4), -30.0)
    logits[torch.arange(len(ids)), torch.tensor(ids)] = 0.0
    assert BeamSearchDecoder(vocab, beam_width=4)(logits[None]) == greedy_ctc(logits[None], vocab)[0].strip()


def _spell(text: str, vocab: list[str], confusions: dict[int, tuple[str, float]]) -> torch.Tensor:
    """Frames that spell ``text`` (char, blank, char, blank...); at position i the char
    shares its frame with an alternative (alt, p_alt)."""
    V = len(vocab) + 1
    rows = []
    for i, ch in enumerate(text):
        row = torch.full((V,), 1e-4)
        alt = confusions.get(i)
        if alt:
            row[vocab.index(alt[0])] = alt[1]
            row[vocab.index(ch)] = 1 - alt[1]
        else:
            row[vocab.index(ch)] = 1.0
        rows.append(row / row.sum())
        blank = torch.full((V,), 1e-4)
        blank[-1] = 1.0
        rows.append(blank / blank.sum())
    return torch.log(torch.stack(rows))


def test_word_lm_fixes_an_acoustically_likely_misspelling():
    vocab = [" "] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    # The acoustics prefer "the cat" (0.6) over "the cot" (0.4); the LM knows only cots.
    logp = _spell("the cat", vocab, {5: ("o", 0.4)})
    assert BeamSearchDecoder(vocab)(logp) == "the cat"
    lm = build_kneser_ney(["the cot is warm", "a cot for the baby", "the cot"], order=2)
    assert BeamSearchDecoder(vocab, lm, alpha=1.0, beta=0.0)(logp) == "the cot"
    # ...and a small weight leaves the acoustics in charge.
    assert BeamSearchDecoder(vocab, lm, alpha=0.01, beta=0.0)(logp) == "the cat"


def test_logit_scale_is_what_matters_for_integer_logits():
    vocab = ["a", "b"]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randint(-300, 300, (12, 3), generator=gen)
    scale = 0.01
    dec = BeamSearchDecoder(vocab, beam_width=8)
    assert dec(logits.float() * scale) == dec(torch.log_softmax(logits.float() * scale, dim=-1))
