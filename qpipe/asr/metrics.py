"""WER and CER with the one text normalization that references and hypotheses share.

Corpus-level rates: total edits over total reference words (or characters), not a
mean of per-utterance rates. The evaluation, the LM builder and the demo recipe all
count errors here, so their numbers are comparable.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Iterable, Optional

NORMALIZATION = "lowercase; punctuation except apostrophes becomes a space; whitespace collapsed"

# Typographic apostrophes count as the ASCII one (they are the same letter in "don't").
_APOSTROPHES = {"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u02b9": "'", "\uff07": "'"}


def normalize_text(text: str) -> str:
    """The one normalization for references and hypotheses alike.

    Lowercase; every Unicode punctuation character except the apostrophe becomes a
    space (so "twenty-one" is two words, "don't" stays one); whitespace collapsed.
    """
    text = unicodedata.normalize("NFKC", text or "").lower()
    chars = []
    for ch in text:
        if ch in _APOSTROPHES or ch == "'":
            chars.append("'")
        elif unicodedata.category(ch).startswith("P"):
            chars.append(" ")
        else:
            chars.append(ch)
    return " ".join("".join(chars).split())


@dataclass
class ErrorCounts:
    """Edit counts of one or more utterances; rates are computed from the totals."""

    word_edits: int = 0
    ref_words: int = 0
    char_edits: int = 0
    ref_chars: int = 0

    def __add__(self, other: "ErrorCounts") -> "ErrorCounts":
        return ErrorCounts(
            self.word_edits + other.word_edits,
            self.ref_words + other.ref_words,
            self.char_edits + other.char_edits,
            self.ref_chars + other.ref_chars,
        )

    @property
    def wer(self) -> Optional[float]:
        """Word error rate as a fraction; None when undefined (no reference words, some edits)."""
        return _rate(self.word_edits, self.ref_words)

    @property
    def cer(self) -> Optional[float]:
        return _rate(self.char_edits, self.ref_chars)


def _rate(edits: int, total: int) -> Optional[float]:
    if total:
        return edits / total
    return 0.0 if edits == 0 else None


def error_counts(reference: str, hypothesis: str, normalize: bool = True) -> ErrorCounts:
    """Word and character edits (substitutions + deletions + insertions) of one utterance."""
    import jiwer

    if normalize:
        reference, hypothesis = normalize_text(reference), normalize_text(hypothesis)
    words = jiwer.process_words(reference, hypothesis)
    chars = jiwer.process_characters(reference, hypothesis)
    return ErrorCounts(
        word_edits=words.substitutions + words.deletions + words.insertions,
        ref_words=words.substitutions + words.deletions + words.hits,
        char_edits=chars.substitutions + chars.deletions + chars.insertions,
        ref_chars=chars.substitutions + chars.deletions + chars.hits,
    )


def corpus_counts(counts: Iterable[ErrorCounts]) -> ErrorCounts:
    """Sum of per-utterance counts: ``corpus_counts(c).wer`` is total edits / total reference words."""
    total = ErrorCounts()
    for c in counts:
        total = total + c
    return total
