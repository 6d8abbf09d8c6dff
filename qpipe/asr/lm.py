"""Word n-gram language models in the ARPA format, built with interpolated Kneser-Ney.

Why qpipe has its own: a small acoustic model spells unseen words the way they sound
("coman sence"), and a word LM in the CTC beam search fixes much of that; KenLM's
``lmplz`` needs a C++ build with Boost, which a CPU-only pip install does not give.
The ARPA format keeps the two interchangeable: :func:`read_arpa` loads an ARPA file
from KenLM (or SRILM) as well as one written by :func:`build_kneser_ney`.

Probabilities are natural-log internally, log10 in the file, as ARPA says.
"""
from __future__ import annotations

import gzip
import io
import math
import os
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from qpipe.ir.errors import QpipeError

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
_LN10 = math.log(10.0)


@dataclass
class NgramLM:
    """A backoff n-gram model: ``logprob[ngram]`` and ``backoff[context]`` (natural log)."""

    order: int
    logprob: dict[tuple[str, ...], float]
    backoff: dict[tuple[str, ...], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (UNK,) not in self.logprob:
            raise QpipeError("the language model has no <unk> unigram; out-of-vocabulary words cannot be scored")
        self._prefixes: Optional[frozenset[str]] = None

    @property
    def vocabulary(self) -> set[str]:
        return {g[0] for g in self.logprob if len(g) == 1 and g[0] not in (BOS, EOS, UNK)}

    @property
    def word_prefixes(self) -> frozenset[str]:
        """Every prefix of every known word: a partial word outside it can only end as <unk>."""
        if self._prefixes is None:
            self._prefixes = frozenset(w[:i] for w in self.vocabulary for i in range(len(w) + 1))
        return self._prefixes

    def score(self, context: Sequence[str], word: str) -> float:
        """ln P(word | context), backing off through shorter contexts; unknown words are <unk>."""
        if (word,) not in self.logprob:
            word = UNK
        context = tuple(context)[-(self.order - 1):] if self.order > 1 else ()
        context = tuple(w if (w,) in self.logprob else UNK for w in context)
        penalty = 0.0
        while True:
            lp = self.logprob.get(context + (word,))
            if lp is not None:
                return penalty + lp
            if not context:  # unreachable: every word or <unk> is a unigram
                return penalty + self.logprob[(UNK,)]
            penalty += self.backoff.get(context, 0.0)
            context = context[1:]

    def sentence_logprob(self, words: Sequence[str]) -> float:
        """ln P(<s> words </s>)."""
        ctx: list[str] = [BOS]
        total = 0.0
        for w in list(words) + [EOS]:
            total += self.score(ctx, w)
            ctx.append(w)
        return total

    def counts(self) -> dict[int, int]:
        out: Counter = Counter(len(g) for g in self.logprob)
        return {n: out[n] for n in range(1, self.order + 1)}


# --------------------------------------------------------------------------- building


def _sentences(lines: Iterable[str]) -> Iterable[list[str]]:
    from qpipe.asr.metrics import normalize_text

    for line in lines:
        words = normalize_text(line).split()
        if words:
            yield words


def build_kneser_ney(sentences: Iterable[str], order: int = 3, discount: Optional[float] = None) -> NgramLM:
    """Interpolated Kneser-Ney from raw text lines (one sentence per line, normalized here).

    The highest order uses counts, lower orders use continuation counts (in how many
    distinct contexts a word follows); one absolute discount per order, estimated as
    n1 / (n1 + 2 n2) unless given. The unigram level interpolates with a uniform
    distribution over the vocabulary plus <unk>, so <unk> gets the mass that unseen
    words deserve. Written as ARPA, interpolated probabilities stay exact: a seen n-gram
    stores its interpolated probability, its context stores the interpolation weight.
    """
    if order < 1:
        raise QpipeError(f"LM order must be at least 1, got {order}")
    counts: list[Counter] = [Counter() for _ in range(order + 1)]
    n_sent = 0
    for words in _sentences(sentences):
        n_sent += 1
        toks = [BOS] + words + [EOS]
        for i in range(len(toks)):
            for n in range(1, order + 1):
                if i + n <= len(toks):
                    g = tuple(toks[i:i + n])
                    if g[-1] == BOS:
                        continue
                    counts[n][g] += 1
    if n_sent == 0:
        raise QpipeError("no text to build a language model from")

    # Kneser-Ney: orders below the top count distinct left contexts, not occurrences.
    # An n-gram starting with <s> has no left context and keeps its count.
    kn: list[Counter] = [Counter() for _ in range(order + 1)]
    kn[order] = counts[order]
    for n in range(1, order):
        c: Counter = Counter()
        for g in counts[n + 1]:
            c[g[1:]] += 1
        for g, k in counts[n].items():
            if g[0] == BOS:
                c[g] = k
        kn[n] = c

    discounts: dict[int, float] = {}
    for n in range(1, order + 1):
        if discount is not None:
            discounts[n] = discount
            continue
        n1 = sum(1 for v in kn[n].values() if v == 1)
        n2 = sum(1 for v in kn[n].values() if v == 2)
        discounts[n] = n1 / (n1 + 2 * n2) if n1 + 2 * n2 > 0 else 0.5
        discounts[n] = min(max(discounts[n], 0.1), 0.9)

    vocab = sorted({g[0] for g in kn[1]} - {BOS})
    # Uniform base over the vocabulary and <unk> (the <s> token is never predicted).
    uniform = 1.0 / (len(vocab) + 1)
    prob: dict[tuple[str, ...], float] = {}
    weight: dict[tuple[str, ...], float] = {}

    for n in range(1, order + 1):
        ctx_total: Counter = Counter()
        ctx_types: Counter = Counter()
        for g, k in kn[n].items():
            ctx_total[g[:-1]] += k
            ctx_types[g[:-1]] += 1
        d = discounts[n]
        for ctx, tot in ctx_total.items():
            weight[ctx] = d * ctx_types[ctx] / tot
        for g, k in kn[n].items():
            ctx = g[:-1]
            lower = uniform if n == 1 else prob[g[1:]]  # every suffix is a lower-order n-gram
            prob[g] = max(k - d, 0.0) / ctx_total[ctx] + weight[ctx] * lower
        if n == 1:
            prob[(UNK,)] = weight[()] * uniform
    logprob = {g: math.log(p) for g, p in prob.items()}
    logprob[(BOS,)] = -99.0 * _LN10  # never predicted; ARPA convention
    backoff = {ctx: math.log(w) for ctx, w in weight.items() if ctx and w > 0}
    return NgramLM(order=order, logprob=logprob, backoff=backoff)


def read_sentences(paths: Sequence[str]) -> list[str]:
    """Normalized sentences from text files (a sentence a line) or NeMo manifests (their 'text')."""
    import json

    from qpipe.asr.metrics import normalize_text

    out: list[str] = []
    for path in paths:
        if not os.path.isfile(path):
            raise QpipeError(f"no such text file: {path}")
        with _open_text(path, "r") as f:
            try:
                lines = f.read().splitlines()
            except UnicodeDecodeError as exc:
                raise QpipeError(f"{path}: not UTF-8 text ({exc.reason})") from None
        is_manifest = path.endswith((".json", ".jsonl")) or (bool(lines) and lines[0].lstrip().startswith("{"))
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if is_manifest:
                try:
                    line = json.loads(line).get("text") or ""
                except (json.JSONDecodeError, AttributeError):
                    raise QpipeError(f"{path}:{lineno}: not a JSON manifest line") from None
            text = normalize_text(line)
            if text:
                out.append(text)
    return out


# --------------------------------------------------------------------------- ARPA I/O


def _open_text(path: str, mode: str):
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, mode + "b"), encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def write_arpa(lm: NgramLM, path: str) -> None:
    """Write atomically (a temporary file renamed into place): never a half-written LM."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(folder):
        raise QpipeError(f"cannot write {path}: folder {folder} does not exist")
    suffix = ".arpa.gz" if path.endswith(".gz") else ".arpa"
    fd, tmp = tempfile.mkstemp(prefix=".qpipe-lm-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        by_order: dict[int, list[tuple[str, ...]]] = defaultdict(list)
        for g in lm.logprob:
            by_order[len(g)].append(g)
        lines = ["\\data\\"]
        lines += [f"ngram {n}={len(by_order[n])}" for n in range(1, lm.order + 1)]
        for n in range(1, lm.order + 1):
            lines += ["", f"\\{n}-grams:"]
            for g in sorted(by_order[n]):
                line = f"{lm.logprob[g] / _LN10:.6f}\t{' '.join(g)}"
                if n < lm.order and g in lm.backoff:
                    line += f"\t{lm.backoff[g] / _LN10:.6f}"
                lines.append(line)
        lines += ["", "\\end\\", ""]
        data = "\n".join(lines).encode("utf-8")
        if path.endswith(".gz"):  # no name, no time stamp in the header: same LM, same bytes
            data = gzip.compress(data, mtime=0)
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_arpa(path: str) -> NgramLM:
    """Load an ARPA file (plain or .gz): KenLM's, SRILM's or qpipe's own."""
    if not os.path.isfile(path):
        raise QpipeError(f"no such language model file: {path}")
    logprob: dict[tuple[str, ...], float] = {}
    backoff: dict[tuple[str, ...], float] = {}
    declared: dict[int, int] = {}
    section = None
    try:
        with _open_text(path, "r") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.strip()
                if not line:
                    continue
                if line == "\\data\\":
                    section = 0
                    continue
                if line == "\\end\\":
                    break
                if line.startswith("\\") and line.endswith("-grams:"):
                    section = int(line[1:line.index("-")])
                    continue
                if section == 0 and line.startswith("ngram "):
                    n, k = line[6:].split("=")
                    declared[int(n)] = int(k)
                    continue
                if not section:
                    raise QpipeError(f"{path}:{lineno}: not an ARPA language model (expected \\data\\ first)")
                parts = line.split()
                if len(parts) not in (section + 1, section + 2):
                    raise QpipeError(f"{path}:{lineno}: malformed {section}-gram line")
                g = tuple(parts[1:section + 1])
                logprob[g] = float(parts[0]) * _LN10
                if len(parts) == section + 2:
                    backoff[g] = float(parts[-1]) * _LN10
    except (UnicodeDecodeError, OSError, EOFError, ValueError) as exc:
        if isinstance(exc, QpipeError):
            raise
        raise QpipeError(f"{path}: cannot read as an ARPA language model: {exc}") from exc
    if not declared:
        raise QpipeError(f"{path}: not an ARPA language model (no \\data\\ section)")
    got: Counter = Counter(len(g) for g in logprob)
    for n, k in declared.items():
        if got[n] != k:
            raise QpipeError(f"{path}: the header declares {k} {n}-grams, the file has {got[n]} (truncated?)")
    if (UNK,) not in logprob:  # KenLM always writes <unk>; others may not
        logprob[(UNK,)] = -100.0
    return NgramLM(order=max(declared), logprob=logprob, backoff=backoff)
