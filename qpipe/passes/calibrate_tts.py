"""calibrate-tts: calibrate on speech rendered offline by espeak-ng from random text (no user data).

Zero-shot in the sense that matters: nothing of the user's or anybody's recordings
is read.  Random sentences are drawn from a built-in word list, spoken by
espeak-ng (``espeak-ng --stdout``; apt-get install espeak-ng) with a seeded choice of
voice, rate and pitch, and turned into features by the model's OWN preprocessor
(the featurizer the frontend handed on in the pipeline state, the same one
``calibrate-data`` and ``qpipe transcribe`` use), so it works for any model with a
mel front end, with or without BatchNorm.  Formant-synthesized speech is not the
speech a model was trained on, but its spectra have the structure of speech
(harmonics, formants, pauses, word rhythm) that noise and distilled inputs lack.
"""
from __future__ import annotations

import random
import shutil
import struct
import subprocess

import numpy as np
import torch
from torch.fx import GraphModule

from qpipe.frontends.features import make_featurizer
from qpipe.ir.errors import QpipeError
from qpipe.ir.passes import Opt, PassContext, PassResult, register
from qpipe.ir.stages import Stage
from qpipe.passes.calibration import calibrate_from_batches

# Common English words (function words, everyday nouns, verbs, numbers): enough
# variety of phones; no sentence of any corpus.
WORDS = tuple("""
a about above across after again air all almost also always am an and animal another answer any are around as
ask at away back be because been before began begin being below best better between big black blue boat body
book both boy bring brother brown build but buy by call came can car carry case change child children city
class clean clear close cold color come could country course cut dark day deep did different do does dog done
door down draw dream drink drive during each early earth east eat eight either end enough even evening ever
every eye face fact fall family far farm fast father feel feet few field find fine fire first fish five floor
follow food foot for form found four free friend from front full game garden gave get girl give glass go gold
good got great green ground group grow had half hand happen happy hard has have he head hear heart heavy help
her here high hill him his hold home horse hot hour house how hundred idea if important in inside into is it
its just keep kind king knew know land large last late laugh lead learn leave left less let letter life light
like line list listen little live long look lost love low machine made make man many map mark may me mean men
might mile mind minute miss money month moon more morning most mother mountain move much music must my name
near need never new next nice night nine no north not nothing now number of off often oil old on once one only
open or order other our out over own page paper part party pass people perhaps person picture piece place plan
plant play please point poor possible power press pretty problem pull put question quick quiet rain ran reach
read ready real red remember rest right river road rock room round run said same saw say school sea second see
seem seven shall she ship short should show side simple since sing sister sit six sleep slow small snow so some
something song soon sound south speak spring stand star start station stay step still stone stop story street
strong study such summer sun sure table take talk teacher tell ten than thank that the their them then there
these they thing think third this those though thought three through time to today together told too took top
toward town tree true try turn twelve two under until up upon us use very voice wait walk want warm was watch
water way we week well went were west what wheel when where which while white who whole why wide will wind window
winter with without woman wood word work world would write year yellow yes yesterday yet you young your
""".split())

# espeak-ng voices: its English languages and some variants; ``f4`` is left out on purpose
# (the demo models' held-out set speaks with it).
DEFAULT_VOICES = "en-us;en-gb;en-us+m3;en-gb+m5;en-us+f2;en-gb+f3;en-gb-scotland;en-029+m2"


def espeak_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise QpipeError(f"calibrate-tts needs espeak-ng, which is not installed ('{name}' not on PATH; apt-get install espeak-ng)")
    return path


def parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the rate of espeak-ng's ``--stdout`` WAV.

    espeak-ng writes the header before it knows the length (RIFF and data sizes are
    placeholders), so the data chunk is read to the end of the stream.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise QpipeError("calibrate-tts: espeak-ng did not write a WAV stream")
    pos, rate, channels, bits = 12, None, 1, 16
    while pos + 8 <= len(data):
        tag, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = pos + 8
        if tag == b"fmt ":
            fmt, channels, rate = struct.unpack("<HHI", data[body:body + 8])
            bits = struct.unpack("<H", data[body + 14:body + 16])[0]
            if fmt != 1 or bits != 16:
                raise QpipeError(f"calibrate-tts: espeak-ng wrote WAV format {fmt} with {bits} bits; expected 16-bit PCM")
        elif tag == b"data":
            if rate is None:
                raise QpipeError("calibrate-tts: espeak-ng's WAV has no fmt chunk before its data")
            raw = data[body:]
            raw = raw[: len(raw) // (2 * channels) * 2 * channels]
            samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
            return samples.reshape(-1, channels).mean(axis=1), int(rate)
        pos = body + size + (size & 1)
    raise QpipeError("calibrate-tts: espeak-ng's WAV has no data chunk")


def render(binary: str, text: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
    """Speak ``text``; one QpipeError line when espeak-ng fails."""
    try:
        proc = subprocess.run([binary, "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text],
                              capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QpipeError(f"calibrate-tts: espeak-ng failed: {type(exc).__name__}: {exc}") from None
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise QpipeError(f"calibrate-tts: espeak-ng -v {voice} failed (exit {proc.returncode}): {msg[0] if msg else 'no message'}")
    return parse_wav(proc.stdout)


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return audio
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(rate, target)
    return resample_poly(audio, target // g, rate // g).astype(np.float32)


def random_sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@register(
    "calibrate-tts",
    needs=Stage.OBSERVED,
    leaves=Stage.CALIBRATED,
    options={
        "utterances": Opt(16, lo=1),
        "min_words": Opt(5, lo=1),
        "max_words": Opt(14, lo=1),
        "voices": DEFAULT_VOICES,
        "rate_min": Opt(140, lo=80, hi=450),  # words per minute, espeak-ng's -s
        "rate_max": Opt(190, lo=80, hi=450),
        "pitch_min": Opt(30, lo=0, hi=99),  # espeak-ng's -p
        "pitch_max": Opt(70, lo=0, hi=99),
        "seed": Opt(0, lo=0, hi=2**32 - 1),
        "espeak": "espeak-ng",
    },
)
def calibrate_tts(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Calibrate on speech that espeak-ng renders from random words, through the model's own preprocessor (no data).

    ``utterances`` sentences of ``min_words``..``max_words`` words from a built-in
    list; each gets a voice from ``voices`` (espeak-ng voice names, ``;`` between
    them, since a pipeline string splits options at commas), a rate (words per minute)
    and a pitch drawn from their ranges; all draws come from ``seed``. Each
    utterance is one batch, as in calibrate-data.
    """
    o = ctx.options
    n, lo, hi = int(o["utterances"]), int(o["min_words"]), int(o["max_words"])
    if n < 1 or lo < 1 or hi < lo:
        raise QpipeError("calibrate-tts: utterances >= 1 and 1 <= min_words <= max_words")
    if not 80 <= int(o["rate_min"]) <= int(o["rate_max"]) <= 450 or not 0 <= int(o["pitch_min"]) <= int(o["pitch_max"]) <= 99:
        raise QpipeError("calibrate-tts: need 80 <= rate_min <= rate_max <= 450 and 0 <= pitch_min <= pitch_max <= 99")
    voices = [v.strip() for v in str(o["voices"]).split(";") if v.strip()]
    if not voices:
        raise QpipeError("calibrate-tts: voices is empty")
    binary = espeak_binary(str(o["espeak"]))
    if not (ctx.state.featurizer_state or ctx.state.preprocessor):
        raise QpipeError("calibrate-tts needs the model's preprocessor (a .nemo model's mel front end) to turn speech into features; this model has none")
    featurizer = make_featurizer(ctx.state.preprocessor, ctx.state.featurizer_state)
    rng = random.Random(int(o["seed"]))
    multiple = int(ctx.state.time_multiple or 1)
    bar = None
    if ctx.progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="calibrate-tts", unit="utt", leave=False, dynamic_ncols=True, mininterval=1.0)
    batches: list[torch.Tensor] = []
    seconds = 0.0
    for _ in range(n):
        text = random_sentence(rng, lo, hi)
        voice = rng.choice(voices)
        rate = rng.randint(int(o["rate_min"]), int(o["rate_max"]))
        pitch = rng.randint(int(o["pitch_min"]), int(o["pitch_max"]))
        audio, sr = render(binary, text, voice, rate, pitch)
        audio = resample(audio, sr, featurizer.sample_rate)
        seconds += len(audio) / featurizer.sample_rate
        feats = featurizer(audio)
        t = (feats.shape[2] // multiple) * multiple
        if t >= max(2, multiple):
            batches.append(feats[:, :, :t].contiguous())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if not batches:
        raise QpipeError("calibrate-tts: no rendered utterance was long enough to calibrate on")
    stats = calibrate_from_batches(gm, batches, f"tts:espeak-ng:seed={int(o['seed'])}")
    stats["audio_seconds"] = round(seconds, 1)
    ctx.state.calibration_inputs = batches[:4]
    return PassResult(gm, True, stats)
