"""Utterances added on top of the corpus (``--add-kokoro`` / ``--add-pico``): planned
apart from the corpus, rendered into WORK_DIR/added once, trained on beside the corpus."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from demo.recipes import demo_models as dm  # noqa: E402
from demo.recipes import fast_train as ft  # noqa: E402
from demo.recipes import kokoro_voice, pico_voice  # noqa: E402
from qpipe.frontends.audio import read_manifest  # noqa: E402

PAIRS = [(f"Sentence number {i}.", f"sentence number {i}") for i in range(500)]


def test_added_utterances_are_seeded_training_sentences_in_the_new_voices(tmp_path):
    added = dm.AddedVoices(kokoro=0.05, pico=0.1)
    jobs = dm.plan_added(tmp_path, 7, 4000, PAIRS, added)
    kokoro = [j for j in jobs if j.engine == "kokoro"]
    pico = [j for j in jobs if j.engine == "pico"]
    assert len(kokoro) == 200 and len(pico) == 400 and len(jobs) == 600
    assert {j.norm for j in jobs} <= {n for _, n in PAIRS}
    assert len({j.norm for j in jobs}) > 300  # drawn across the sentences, not a prefix
    assert {j.voice for j in kokoro} == set(kokoro_voice.VOICES)
    assert {j.voice for j in pico} == set(pico_voice.VOICES)
    # the corpus's recording conditions: about half with noise, some reverb, all a gain
    noisy = sum(j.noise_snr is not None for j in jobs) / len(jobs)
    assert 0.4 < noisy < 0.6 and any(j.reverb for j in jobs) and any(j.band for j in jobs)
    assert all(-12 <= j.gain_db <= 0 and j.sox_pitch == 0 and j.gender is None for j in jobs)
    assert len({j.out for j in jobs}) == len(jobs)
    assert all(Path(j.out).parent == tmp_path / "added" for j in jobs)
    # seeded; each engine from its own RNG: Kokoro's share never moves Pico's utterances
    assert dm.plan_added(tmp_path, 7, 4000, PAIRS, added) == jobs
    assert dm.plan_added(tmp_path, 7, 4000, PAIRS, dm.AddedVoices(pico=0.1)) == pico
    assert dm.plan_added(tmp_path, 8, 4000, PAIRS, added) != jobs
    assert dm.plan_added(tmp_path, 7, 4000, PAIRS, dm.AddedVoices()) == []


def test_added_voices_reject_bad_shares():
    with pytest.raises(ValueError, match="added kokoro"):
        dm.AddedVoices(kokoro=-0.1).check()
    with pytest.raises(ValueError, match="added pico"):
        dm.AddedVoices(pico=1.5).check()
    assert not dm.AddedVoices() and dm.AddedVoices(pico=0.2).params() == {"pico": 0.2}


def test_recipe_refuses_a_bad_added_share_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "demo" / "make-demo-models"),
                        "--add-pico", "-1", "--work-dir", str(tmp_path / "w")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "added pico" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "w").exists()


def test_added_utterances_render_once_and_again_only_when_their_options_change(
        tmp_path, monkeypatch):
    rendered = []

    def fake_run_jobs(jobs, workers, log_every=1000):
        rendered.append(len(jobs))
        out = []
        for j in jobs:
            Path(j.out).write_bytes(b"")
            out.append({"audio_filepath": j.out, "duration": 9.0 if j.idx == 0 else 2.0,
                        "text": j.norm, "voice": f"{j.engine}:{j.voice}"})
        return out
    monkeypatch.setattr(dm, "_run_jobs", fake_run_jobs)
    params = {"seed": 1, "n_train": 1000, "use_piper": True}
    added = dm.AddedVoices(kokoro=0.01, pico=0.02)
    manifest, stats = dm.build_added(tmp_path, params, PAIRS, added)
    assert rendered == [30]
    entries = read_manifest(str(manifest))
    # the first utterance of each engine is over max_duration (8 s) and left out
    assert len(entries) == 28 and stats["utterances"] == 28
    assert stats["by_engine"] == {"kokoro": 9, "pico": 19}
    assert stats["hours"] == pytest.approx(28 * 2.0 / 3600, abs=1e-3)
    assert {e["voice"].split(":")[0] for e in entries} == {"kokoro", "pico"}

    features = tmp_path / "features" / "added.pt"
    features.parent.mkdir()
    features.write_bytes(b"cached")
    assert dm.build_added(tmp_path, params, PAIRS, added) == (manifest, stats)
    assert rendered == [30] and features.exists()  # reused, features kept
    dm.build_added(tmp_path, params, PAIRS, dm.AddedVoices(pico=0.02))
    assert rendered == [30, 20] and not features.exists()  # re-rendered, stale cache gone
    dm.build_added(tmp_path, {**params, "seed": 2}, PAIRS, dm.AddedVoices(pico=0.02))
    assert rendered == [30, 20, 20]  # a different corpus: its own added utterances


def test_training_reads_the_corpus_and_its_added_utterances_as_one(tmp_path):
    def cache(name, n, voice):
        data = {"features": [torch.full((4, 3 + i), float(i)) for i in range(n)],
                "tokens": [torch.tensor([i]) for i in range(n)],
                "text": [f"{name} {i}" for i in range(n)], "voice": [voice] * n,
                "manifest": f"{name}.json"}
        torch.save(data, tmp_path / f"{name}.pt")
        return str(tmp_path / f"{name}.pt")
    base, extra = cache("train", 3, "espeak:x"), cache("added", 2, "pico:en-US")
    one = ft.load_caches(base)
    assert one["text"] == ["train 0", "train 1", "train 2"]
    both = ft.load_caches([base, extra])
    assert both["text"] == ["train 0", "train 1", "train 2", "added 0", "added 1"]
    assert both["voice"][3:] == ["pico:en-US"] * 2
    assert [f.shape[1] for f in both["features"]] == [3, 4, 5, 3, 4]
    assert [int(t) for t in both["tokens"]] == [0, 1, 2, 0, 1]
    assert both["manifest"] == ["train.json", "added.json"]


def test_model_card_says_what_was_added_on_top():
    stats = {"train": {"utterances": 1000, "hours": 1.0},
             "added": {"utterances": 28, "hours": 0.016, "by_engine": {"kokoro": 9, "pico": 19},
                       "kokoro": 0.01, "pico": 0.02}}
    text = dm._voice_mix_text(stats)
    assert "Added on top" in text and "28 utterances (0.016 h)" in text
    assert "9 by Kokoro-82M" in text and "19 by SVOX Pico" in text
    assert "1028 utterances, 1.016 h, in all" in text
    assert dm._voice_mix_text({"train": {"utterances": 5}}) == ""
    json.dumps(stats)  # the card's JSON block holds these stats as they are
