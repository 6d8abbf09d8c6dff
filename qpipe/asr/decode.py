"""CTC decoding: greedy (argmax per frame, merge repeats, drop blanks: the last class) and
prefix beam search with an optional word n-gram LM.

Works on integer logits as they are: the argmax of the integer logits is the
argmax of the float log-probabilities (log_softmax is a per-frame shift).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch


def greedy_ctc(logits: torch.Tensor, vocabulary: list[str], blank: int | None = None) -> list[str]:
    """Texts for a batch of logits (B, T, V); blank defaults to the last class (NeMo's)."""
    blank = len(vocabulary) if blank is None else blank
    ids = logits.argmax(dim=-1)
    texts = []
    for row in ids.tolist():
        out, prev = [], None
        for i in row:
            if i != prev and i != blank and i < len(vocabulary):
                out.append(vocabulary[i])
            prev = i
        texts.append(_join(out))
    return texts


def _join(tokens: list[str]) -> str:
    """Characters join as they are; sentencepiece pieces mark word starts with U+2581."""
    if any(t.startswith("\u2581") for t in tokens):
        return "".join(tokens).replace("\u2581", " ").strip()
    return "".join(tokens)


# --------------------------------------------------------------------------- beam search

_NEG_INF = float("-inf")


def _logaddexp(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    if b == _NEG_INF:
        return a
    return a + math.log1p(math.exp(b - a))


class _Prefix:
    """One hypothesis prefix: a node in the tree of token sequences, with its LM state."""

    __slots__ = ("parent", "token", "context", "partial", "lm", "words", "oov", "children")

    def __init__(self, parent, token, context, partial, lm, words, oov):
        self.parent, self.token = parent, token
        self.context, self.partial = context, partial  # completed-word context, word in progress
        self.lm, self.words, self.oov = lm, words, oov  # ln P_LM so far, word count, partial scored as <unk>
        self.children: dict[int, "_Prefix"] = {}

    def text(self, vocabulary: Sequence[str]) -> str:
        toks = []
        node = self
        while node.parent is not None:
            toks.append(vocabulary[node.token])
            node = node.parent
        return _join(toks[::-1]).strip()


@dataclass
class BeamSearchDecoder:
    """CTC prefix beam search, optionally with a word n-gram LM (shallow fusion).

    A hypothesis scores ``ln P_ctc + alpha * ln P_lm + beta * words``. Words are scored
    when they end (a space, a U+2581 piece, or the end of the utterance, which also
    scores ``</s>``). A word in progress that is no longer a prefix of any LM word is
    charged ``<unk>`` plus ``unk_penalty`` at once, so misspellings leave the beam early
    instead of crowding it until the next space. Without an LM, alpha and beta play no
    part: the search returns the most probable labeling it finds. Input is per-frame
    scores that log_softmax turns into log-probabilities: float log-probs, or integer
    logits times their quantization scale. alpha 0.8 and beta 1.5 were chosen on the
    demo models' dev set.
    """

    vocabulary: Sequence[str]
    lm: Any = None  # qpipe.asr.lm.NgramLM
    alpha: float = 0.8
    beta: float = 1.5
    beam_width: int = 32
    token_beam: float = 10.0  # per frame, try only tokens within this many nats of the best
    max_tokens_per_frame: int = 8
    unk_penalty: float = -5.0
    blank: Optional[int] = None

    def __call__(self, scores: torch.Tensor) -> str:
        if scores.dim() == 3:
            if scores.shape[0] != 1:
                raise ValueError("BeamSearchDecoder decodes one utterance at a time: (T, V) or (1, T, V)")
            scores = scores[0]
        vocab = list(self.vocabulary)
        blank = len(vocab) if self.blank is None else self.blank
        logp = torch.log_softmax(scores.float(), dim=-1)
        top_v, top_i = logp.topk(min(self.max_tokens_per_frame, logp.shape[-1]), dim=-1)
        rows, cand_v, cand_i = logp.tolist(), top_v.tolist(), top_i.tolist()

        lm = self.lm
        prefixes = lm.word_prefixes if lm is not None else None
        root = _Prefix(None, None, ("<s>",), "", 0.0, 0, False)
        beams: dict[_Prefix, list[float]] = {root: [0.0, _NEG_INF]}  # [p_blank, p_nonblank]

        def child(node: _Prefix, tok: int) -> _Prefix:
            c = node.children.get(tok)
            if c is None:
                c = self._extend(node, tok, vocab[tok] if tok < len(vocab) else "", lm, prefixes)
                node.children[tok] = c
            return c

        for row, vals, idxs in zip(rows, cand_v, cand_i):
            best = vals[0]
            cands = [i for v, i in zip(vals, idxs) if v >= best - self.token_beam and i != blank]
            p_blank = row[blank] if blank < len(row) else _NEG_INF
            nxt: dict[_Prefix, list[float]] = {}
            for node, (pb, pnb) in beams.items():
                total = _logaddexp(pb, pnb)
                slot = nxt.setdefault(node, [_NEG_INF, _NEG_INF])
                slot[0] = _logaddexp(slot[0], total + p_blank)
                if node.token is not None and node.token != blank:
                    slot[1] = _logaddexp(slot[1], pnb + row[node.token])  # repeat collapses
                for tok in cands:
                    c = child(node, tok)
                    add = (pb if tok == node.token else total) + row[tok]
                    cs = nxt.setdefault(c, [_NEG_INF, _NEG_INF])
                    cs[1] = _logaddexp(cs[1], add)
            ranked = sorted(nxt.items(), key=lambda kv: self._score(kv[0], _logaddexp(*kv[1])), reverse=True)
            beams = dict(ranked[: self.beam_width])

        best_text, best_score = "", _NEG_INF
        for node, (pb, pnb) in beams.items():
            s = _logaddexp(pb, pnb) + self._final_bonus(node)
            if s > best_score:
                best_text, best_score = node.text(vocab), s
        return best_text

    # -- scoring

    def _score(self, node: _Prefix, acoustic: float) -> float:
        if self.lm is None:
            return acoustic
        return acoustic + self.alpha * node.lm + self.beta * node.words

    def _final_bonus(self, node: _Prefix) -> float:
        if self.lm is None:
            return 0.0
        lm_total, words = node.lm, node.words
        context = node.context
        if node.partial:
            if not node.oov:
                lm_total += self.lm.score(context, node.partial)
            context = context + (node.partial,)
        lm_total += self.lm.score(context, "</s>")
        if node.partial:
            words += 1
        return self.alpha * lm_total + self.beta * words

    def _extend(self, node: _Prefix, tok: int, piece: str, lm, prefixes) -> _Prefix:
        context, partial, lm_score, words, oov = node.context, node.partial, node.lm, node.words, node.oov
        starts_word = piece == " " or piece.startswith("\u2581")
        if starts_word:
            if partial:
                if lm is not None and not oov:
                    lm_score += lm.score(context, partial)
                context = (context + (partial,))[-8:]
                words += 1
            partial, oov = piece.lstrip(" \u2581"), False
        else:
            partial = partial + piece
        if lm is not None and partial and not oov and partial not in prefixes:
            lm_score += lm.score(context, "<unk>") + self.unk_penalty
            oov = True
        return _Prefix(node, tok, context, partial, lm_score, words, oov)


# --------------------------------------------------------------------------- settings


@dataclass
class Decoding:
    """How logits become text, the same for every model: greedy, or beam search (+ word LM)."""

    beam_width: Optional[int] = None  # None: greedy unless an LM is given
    lm_path: Optional[str] = None
    alpha: float = 0.8
    beta: float = 1.5
    _lm: Any = None

    @property
    def method(self) -> str:
        return "beam" if (self.beam_width or self.lm_path) else "greedy"

    def load(self) -> None:
        """Read the LM now: a bad file fails before any model runs."""
        if self.lm_path and self._lm is None:
            from qpipe.asr.lm import read_arpa

            self._lm = read_arpa(self.lm_path)

    def decoder_for(self, vocabulary: Sequence[str], logit_scale: float = 1.0) -> Callable[[torch.Tensor], str]:
        """Model output (1, T, V) -> text. Greedy reads integer logits as they are; the beam
        search needs log-probabilities, so it reads them times ``logit_scale``."""
        vocab = list(vocabulary)
        if self.method == "greedy":
            return lambda logits: greedy_ctc(logits, vocab)[0]
        self.load()
        beam = BeamSearchDecoder(vocab, self._lm, alpha=self.alpha, beta=self.beta, beam_width=self.beam_width or 32)
        return lambda logits: beam(logits.float() * logit_scale)

    def describe(self) -> dict[str, Any]:
        if self.method == "greedy":
            return {"method": "greedy"}
        out: dict[str, Any] = {"method": "beam", "beam_width": self.beam_width or 32}
        if self.lm_path:
            out.update({"lm": os.path.abspath(self.lm_path), "lm_order": self._lm.order if self._lm else None,
                        "alpha": self.alpha, "beta": self.beta})
        return out
