"""The demo-model recipe's pure helpers: text normalization, batching, greedy decoding."""
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes import demo_models as dm  # noqa: E402
from recipes import fast_train as ft  # noqa: E402


@pytest.mark.parametrize("raw, norm", [
    ("Don't panic!", "don't panic"),
    ("  'Quoted'  words -- here.", "quoted words here"),
    ("It\u2019s 42 o'clock", "it's o'clock"),
])
def test_normalize_text_keeps_letters_and_inner_apostrophes(raw, norm):
    assert dm.normalize_text(raw) == norm
    assert set(dm.normalize_text(raw)) <= set(dm.LABELS)


def test_batches_cover_every_utterance_once():
    rng = random.Random(0)
    lengths = [rng.randrange(10, 500) for _ in range(1003)]
    batches = ft.make_batches(lengths, 16, random.Random(1))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert max(len(b) for b in batches) == 16


def test_batches_are_seeded_and_sortagrad_is_ascending():
    lengths = [random.Random(2).randrange(10, 500) for _ in range(200)]
    a = ft.make_batches(lengths, 8, random.Random(5))
    b = ft.make_batches(lengths, 8, random.Random(5))
    assert a == b
    asc = [lengths[i] for b in ft.make_batches(lengths, 8, random.Random(5), True) for i in b]
    assert asc == sorted(lengths)


def test_greedy_decode_collapses_repeats_and_drops_blank():
    blank = len(dm.LABELS)
    # "h h blank e l l blank l o" -> "hello"
    ids = [8, 8, blank, 5, 12, 12, blank, 12, 15, blank]
    lp = torch.full((1, len(ids), blank + 1), -10.0)
    for t, i in enumerate(ids):
        lp[0, t, i] = 0.0
    assert ft.greedy_decode(lp, torch.tensor([len(ids)])) == ["hello"]
    assert ft.greedy_decode(lp, torch.tensor([2])) == ["h"]
