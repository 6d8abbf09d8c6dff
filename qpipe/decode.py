"""Greedy CTC decoding: argmax per frame, merge repeats, drop blanks (the last class).

Works on integer logits as they are: the argmax of the integer logits is the
argmax of the float log-probabilities (log_softmax is a per-frame shift).
"""
from __future__ import annotations

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
