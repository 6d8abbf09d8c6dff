"""Step-budgeted CPU training of the demo models on cached log-mel features.

Why not Lightning + NeMo's audio data loader (the first recipe): on a 2-core machine the
loader worker took a core from the model, every epoch re-decoded and re-featurized the
same audio, and the wall-clock LR schedule made a run's result depend on how busy the
machine was.  Here the features are computed once by the model's own NeMo preprocessor
(``AudioToMelSpectrogramPreprocessor``; its per-utterance normalization makes caching
exact), training is a plain loop over NeMo's ``EncDecCTCModel.forward`` (SpecAugment,
encoder, decoder) and ``model.loss`` (NeMo's CTC loss), and its length is a fixed number
of optimizer steps: a re-run on another machine takes the same steps with the same
batches, only the wall clock differs.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import torch

from demo.recipes import demo_models as dm
from demo.recipes.distill import pad_features as _pad

# Steps per model: under an hour each when both train side by side on the 2-core
# development machine (one thread each); measured times are in the model cards.  A
# model's weights depend on its steps, seed and thread count only, never on what else
# runs beside it.
DEFAULT_STEPS = {"quartznet": 5800, "conformer": 8600}
# Threads per model.  Two threads for the Conformer alone on the machine were measured
# (2026-11-26): 12400 steps in 58.4 min (0.28 s/step against 0.38 side by side), but
# held-out WER only 50.9 -> 49.1 % greedy and 34.3 -> 34.4 % with the LM, not worth
# doubling the recipe's wall clock; see the Conformer's model card.
HYPER = {"quartznet": {"lr": 3e-3, "warmup_steps": 200, "batch_size": 32, "precision": "bf16",
                       "threads": 1},
         "conformer": {"lr": 4e-3, "warmup_steps": 200, "batch_size": 16, "precision": "bf16",
                       "threads": 1}}
# The teacher when a run does not train the Conformer and OUT_DIR holds none.
COMMITTED_TEACHER = Path(__file__).resolve().parents[2] / "models" / "demo_conformer.nemo"


def cache_features(manifest: Path, cache: Path, preprocessor_cfg: dict | None = None,
                   batch: int = 32) -> dict:
    """Featurize every utterance of a manifest once; store fp16 [64, T] + token ids."""
    cache = Path(cache)
    if cache.exists():
        return torch.load(cache, weights_only=False)
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from tqdm import tqdm

    from qpipe.frontends.audio import load_audio, read_manifest
    pre = instantiate(OmegaConf.create(preprocessor_cfg or dm._preprocessor_cfg()))
    pre.eval()
    entries = read_manifest(str(manifest))
    order = sorted(range(len(entries)), key=lambda i: entries[i]["duration"])
    label_id = {c: i for i, c in enumerate(dm.LABELS)}
    feats: list[torch.Tensor | None] = [None] * len(entries)
    with torch.inference_mode():
        for s in tqdm(range(0, len(order), batch), desc=f"features {Path(manifest).name}",
                      unit="batch", mininterval=5):
            idx = order[s:s + batch]
            wavs = [torch.from_numpy(load_audio(entries[i]["audio_filepath"], dm.SAMPLE_RATE))
                    for i in idx]
            lens = torch.tensor([len(w) for w in wavs])
            x = torch.zeros(len(wavs), int(lens.max()))
            for j, w in enumerate(wavs):
                x[j, :len(w)] = w
            f, flen = pre(input_signal=x, length=lens)
            for j, i in enumerate(idx):
                feats[i] = f[j, :, :int(flen[j])].to(torch.float16).clone()
    data = {
        "features": feats,
        "tokens": [torch.tensor([label_id[c] for c in e["text"] if c in label_id],
                                dtype=torch.int32) for e in entries],
        "text": [e["text"] for e in entries],
        "voice": [e.get("voice", "") for e in entries],
        "manifest": str(manifest),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(cache)
    return data


def load_caches(paths: str | Path | list) -> dict:
    """One feature cache, or several (the corpus and its added utterances) as one:
    utterances in the order given, so the batches depend only on the caches' order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    parts = [torch.load(p, weights_only=False) for p in paths]
    if len(parts) == 1:
        return parts[0]
    keys = ("features", "tokens", "text", "voice")
    return {**{k: [x for part in parts for x in part[k]] for k in keys},
            "manifest": [part["manifest"] for part in parts]}


def make_batches(lengths: list[int], batch_size: int, rng: random.Random,
                 sort_ascending: bool = False,
                 repeats: list[int] | None = None) -> list[list[int]]:
    """Semi-sorted batches: shuffle, sort inside pools of 50 batches, shuffle batches.

    ``sort_ascending`` gives SortaGrad order (short utterances first) for the first
    epoch, which gets CTC off its all-blank plateau sooner (each utterance once).
    ``repeats`` (one count per utterance) lets an epoch see some utterances more than
    once: the voices the model finds hardest get a larger share of the steps.
    """
    idx = list(range(len(lengths)))
    if sort_ascending:
        idx.sort(key=lambda i: lengths[i])
        return [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    if repeats is not None:
        idx = [i for i in idx for _ in range(repeats[i])]
    rng.shuffle(idx)
    pool = batch_size * 50
    batches = []
    for s in range(0, len(idx), pool):
        chunk = sorted(idx[s:s + pool], key=lambda i: lengths[i])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _engine(voice: str) -> str:
    """'flite:kal' -> 'flite' (manifest voices are ENGINE:VOICE)."""
    return voice.split(":")[0]


def engine_repeats(voices: list[str], weights: dict[str, int] | None) -> list[int] | None:
    """Per-utterance repeat counts from per-engine weights (``{"piper": 3}``: each piper
    utterance three times an epoch); engines not named count once."""
    if not weights:
        return None
    return [max(1, int(weights.get(_engine(v), 1))) for v in voices]


class MelWarp:
    """Vocal-tract-length perturbation of cached log-mel features.

    Scaling every formant by ``alpha`` (a shorter vocal tract: alpha > 1) moves the
    spectrum along the frequency axis, so on a mel spectrogram it is a resampling of the
    rows: row m takes the value the unwarped utterance had at frequency
    ``center(m) / alpha``.  It gives the male-only voices of an engine (flite's kal, awb,
    rms; piper's joe) the formants of shorter vocal tracts without re-synthesizing audio.
    Applied to the cached, per-feature-normalized rows, it moves each band's time course
    to its warped place, which is the speaker cue the normalization leaves.  Measured on
    the demo Conformer (2026-11-26): it did not bring flite ``slt`` closer; see its card.
    """

    def __init__(self, p: float, lo: float, hi: float, engines: list[str],
                 n_mels: int = 64, sample_rate: int = 16000):
        import librosa
        if not (0.0 <= p <= 1.0 and 0.0 < lo <= hi):
            raise ValueError(f"mel_warp needs 0 <= p <= 1 and 0 < lo <= hi, got p={p}, "
                             f"lo={lo}, hi={hi}")
        self.p, self.lo, self.hi, self.engines = p, lo, hi, set(engines)
        # bin centers of the slaney mel filterbank NeMo's preprocessor uses
        self.centers = librosa.mel_frequencies(n_mels + 2, fmin=0.0,
                                               fmax=sample_rate / 2)[1:-1].astype("float64")

    def rows(self, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Source rows (below, above) and the weight of ``above`` for each output row."""
        import numpy as np
        pos = np.interp(self.centers / alpha, self.centers, np.arange(len(self.centers)))
        lo = np.floor(pos).astype("int64")
        hi = np.minimum(lo + 1, len(self.centers) - 1)
        return torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy(pos - lo).float()

    def warp(self, feat: torch.Tensor, alpha: float) -> torch.Tensor:
        lo, hi, w = self.rows(alpha)
        f = feat.float()
        return f[lo] * (1 - w[:, None]) + f[hi] * w[:, None]

    def maybe(self, feat: torch.Tensor, voice: str, rng: random.Random) -> torch.Tensor:
        if _engine(voice) not in self.engines or rng.random() >= self.p:
            return feat
        return self.warp(feat, rng.uniform(self.lo, self.hi))

    def describe(self) -> dict:
        return {"p": self.p, "alpha": [self.lo, self.hi], "engines": sorted(self.engines)}


def greedy_decode(log_probs: torch.Tensor, lens: torch.Tensor) -> list[str]:
    """qpipe's greedy CTC decoding, each row cut to its valid frames."""
    from qpipe.asr.decode import greedy_ctc
    return [greedy_ctc(row[None, :int(n)], dm.LABELS)[0].strip()
            for row, n in zip(log_probs, lens)]


@torch.inference_mode()
def evaluate_cached(model, data: dict, batch_size: int = 32) -> dict:
    model.eval()
    n = len(data["features"])
    order = sorted(range(n), key=lambda i: data["features"][i].shape[1])
    hyps = [""] * n
    for s in range(0, n, batch_size):
        idx = order[s:s + batch_size]
        x, lens = _pad([data["features"][i] for i in idx])
        lp, enc_len, _ = model.forward(processed_signal=x, processed_signal_length=lens)
        for i, h in zip(idx, greedy_decode(lp, enc_len)):
            hyps[i] = h
    return dm.wer_cer(data["text"], hyps) | {"hyps": hyps}


def build_model(arch: str, lr: float = 1e-3, weight_decay: float = 1e-3):
    from nemo.collections.asr.models import EncDecCTCModel
    optim = {"name": "adamw", "lr": lr, "betas": [0.9, 0.98], "weight_decay": weight_decay}
    return EncDecCTCModel(cfg=dm.model_cfg(arch, optim), trainer=None)


def train_cached(arch: str, train_data: dict, dev_data: dict | None, out_path: Path,
                 steps: int, seed: int, batch_size: int = 32, lr: float = 3e-3,
                 warmup_steps: int = 200, weight_decay: float = 1e-3,
                 threads: int = 1, eval_every: int = 1000, log_every: int = 100,
                 sortagrad: bool = True, log_file: Path | None = None,
                 precision: str = "fp32", engine_weights: dict[str, int] | None = None,
                 mel_warp: dict | None = None, distill: dict | None = None) -> dict:
    """Train ``arch`` for exactly ``steps`` optimizer steps; save a .nemo; return facts.

    ``precision="bf16"`` runs the forward pass under CPU bfloat16 autocast (weights,
    optimizer and the CTC loss stay fp32): on a CPU with AVX512-BF16 a Conformer step
    takes about two thirds of the fp32 time, so the same hour buys more steps.

    ``distill`` (``demo.recipes.distill``): ``{"log_probs": [...], "weight": w, "temperature":
    t, "teacher": name}`` trains on ``(1 - w) * CTC + w * KL(teacher || student)``, the
    teacher's frame posteriors given per training utterance.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, not {precision!r}")
    if distill is not None:
        from demo.recipes.distill import distillation_loss
        if not 0.0 < distill["weight"] <= 1.0:
            raise ValueError(f"distillation weight must be in (0, 1], got {distill['weight']}")
        if len(distill["log_probs"]) != len(train_data["features"]):
            raise ValueError(f"{len(distill['log_probs'])} teacher utterances for "
                             f"{len(train_data['features'])} training utterances")
    torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)
    from nemo.utils import logging as nemo_logging
    nemo_logging.setLevel("ERROR")
    peak_lr, warmup = lr, warmup_steps
    model = build_model(arch, lr, weight_decay)
    model.train()
    n_params = dm.count_params(model)
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.98),
                            weight_decay=weight_decay)
    min_lr = peak_lr * 0.01

    def lr_at(s: int) -> float:
        if s < warmup:
            return peak_lr * (s + 1) / warmup
        frac = (s - warmup) / max(1, steps - warmup)
        return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * frac))

    lengths = [f.shape[1] for f in train_data["features"]]
    voices = train_data.get("voice") or [""] * len(lengths)
    repeats = engine_repeats(voices, engine_weights)
    warper = MelWarp(**mel_warp) if mel_warp else None
    rng = random.Random(seed)
    warp_rng = random.Random(seed + 1)  # batches stay the same with or without warping
    log = open(log_file, "a") if log_file else None

    def say(msg: str) -> None:
        print(msg, flush=True)
        if log:
            log.write(msg + "\n")
            log.flush()

    say(f"[train:{arch}] {n_params} parameters, {steps} steps, batch {batch_size}, "
        f"peak lr {peak_lr}, warmup {warmup}, {precision}, {len(lengths)} utterances")
    history = []
    t0 = time.time()
    step, epoch, batches = 0, 0, []
    loss_acc, n_acc = 0.0, 0
    while step < steps:
        if not batches:
            batches = make_batches(lengths, batch_size, rng,
                                   sort_ascending=sortagrad and epoch == 0, repeats=repeats)
            epoch += 1
        idx = batches.pop(0)
        feats = [train_data["features"][i] for i in idx]
        if warper is not None:
            feats = [warper.maybe(f, voices[i], warp_rng) for f, i in zip(feats, idx)]
        x, xl = _pad(feats)
        toks = [train_data["tokens"][i] for i in idx]
        tl = torch.tensor([len(t) for t in toks])
        y = torch.zeros(len(toks), int(tl.max()), dtype=torch.long)
        for j, t in enumerate(toks):
            y[j, :len(t)] = t
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            lp, enc_len, _ = model.forward(processed_signal=x, processed_signal_length=xl)
        loss = model.loss(log_probs=lp.float(), targets=y, input_lengths=enc_len, target_lengths=tl)
        if distill is not None:
            kd = distillation_loss(lp.float(), enc_len, [distill["log_probs"][i] for i in idx],
                                   distill["temperature"])
            loss = (1 - distill["weight"]) * loss + distill["weight"] * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_acc += loss.item()
        n_acc += 1
        if step % log_every == 0 or step == steps:
            say(f"[train:{arch}] step {step} epoch {epoch} loss {loss_acc / n_acc:.2f} "
                f"lr {lr_at(step - 1):.2e} elapsed {time.time() - t0:.0f} s")
            loss_acc, n_acc = 0.0, 0
        if dev_data is not None and (step % eval_every == 0 or step == steps):
            r = evaluate_cached(model, dev_data)
            history.append({"step": step, "dev_wer": r["wer"], "dev_cer": r["cer"],
                            "elapsed_s": round(time.time() - t0, 1)})
            say(f"[train:{arch}] step {step} dev WER {r['wer']:.3f} CER {r['cer']:.3f}")
            model.train()
    train_s = time.time() - t0
    model.eval()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model.save_to(str(out_path))
    say(f"[train:{arch}] saved {out_path} after {steps} steps, {train_s / 60:.1f} min")
    return {"arch": arch, "params": n_params, "steps": steps, "epochs": epoch,
            "train_seconds": round(train_s, 1),
            "seconds_per_step": round(train_s / max(1, steps), 3),
            "batch_size": batch_size, "peak_lr": peak_lr, "warmup_steps": warmup,
            "optim": {"name": "adamw", "betas": [0.9, 0.98],
                      "weight_decay": opt.param_groups[0]["weight_decay"]},
            "schedule": "linear warmup, cosine to 1 % by the last step",
            "sortagrad": sortagrad, "torch_threads": threads, "seed": seed,
            "precision": precision,
            "engine_weights": dict(engine_weights) if engine_weights else None,
            "mel_warp": warper.describe() if warper else None,
            "distill": {k: distill[k] for k in ("teacher", "weight", "temperature",
                                                "teacher_seconds") if k in distill}
            if distill else None,
            "spec_augment": dict(model.cfg.spec_augment) if model.cfg.get("spec_augment") else None,
            "history": history,
            "device_name": "CPU", "cpu_cores": os.cpu_count(),
            "nemo_bytes": out_path.stat().st_size}


if __name__ == "__main__":  # quick timing probe: python -m demo.recipes.fast_train ARCH
    import sys
    arch = sys.argv[1]
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    torch.set_num_threads(threads)
    model = build_model(arch)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(32, 64, 276)
    xl = torch.full((32,), 276)
    y = torch.randint(0, 28, (32, 40))
    yl = torch.full((32,), 40)
    for i in range(6):
        t = time.time()
        lp, el, _ = model.forward(processed_signal=x, processed_signal_length=xl)
        loss = model.loss(log_probs=lp, targets=y, input_lengths=el, target_lengths=yl)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(arch, threads, f"{time.time() - t:.3f} s/step", json.dumps(dm.count_params(model)))


def _train_child(job: dict) -> dict:
    """One model in its own process (spawned: NeMo and torch threads start clean)."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    train_data = load_caches(job["train_cache"])
    dev_data = torch.load(job["dev_cache"], weights_only=False)
    distill = None
    if job.get("distill"):
        from demo.recipes.distill import teacher_log_probs
        d = job["distill"]
        log_probs, seconds = teacher_log_probs(Path(d["teacher"]), train_data,
                                               threads=job["threads"])
        distill = {**d, "teacher": Path(d["teacher"]).name, "log_probs": log_probs,
                   "teacher_seconds": round(seconds, 1)}
    return train_cached(job["arch"], train_data, dev_data, Path(job["out"]), job["steps"],
                        job["seed"], batch_size=job["batch_size"], lr=job["lr"],
                        warmup_steps=job["warmup_steps"], threads=job["threads"],
                        eval_every=job["eval_every"], log_file=Path(job["log"]),
                        precision=job["precision"],
                        engine_weights=job.get("engine_weights"),
                        mel_warp=job.get("mel_warp"), distill=distill) | {
                            "concurrent_jobs": job.get("concurrent_jobs", 1)}


def concurrent_jobs(threads: list[int], jobs: int | None, cores: int) -> int:
    """How many training processes run at once: all of them when their threads fit the
    cores (unless ``jobs`` says otherwise), else one at a time."""
    if jobs is None:
        jobs = len(threads) if sum(threads) <= cores else 1
    return max(1, min(jobs, len(threads)))


def training_waves(todo: list[dict], out_dir: Path, distill: dict | None) -> list[list[dict]]:
    """Which training jobs run together, in order: all at once, unless the QuartzNet
    distills from the Conformer this run trains (then the teacher first).  Marks the
    student's job with its teacher."""
    student = next((j for j in todo if j["arch"] == "quartznet"), None)
    if not distill or student is None:
        return [todo]
    teacher, trained_here = distillation_teacher(
        out_dir, distill.get("teacher"), any(j["arch"] == "conformer" for j in todo))
    student["distill"] = {"weight": distill["weight"], "temperature": distill["temperature"],
                          "teacher": str(teacher)}
    if trained_here:
        return [[j for j in todo if j is not student], [student]]
    return [todo]


def distillation_teacher(out_dir: Path, teacher: str | Path | None, trains_conformer: bool,
                         committed: Path = COMMITTED_TEACHER) -> tuple[Path, bool]:
    """The teacher's path and whether this run trains it.

    Without ``teacher``: OUT_DIR/demo_conformer.nemo when this run trains it or it is
    already there, else the committed ``models/demo_conformer.nemo``, so that
    ``--only quartznet --out-dir DIR`` rebuilds the committed QuartzNet.  A teacher that
    neither exists nor is trained here is an error."""
    in_run = Path(out_dir) / "demo_conformer.nemo"
    if teacher is None:
        if trains_conformer:
            return in_run, True
        path = in_run if in_run.is_file() else Path(committed)
    else:
        path = Path(teacher)
        if trains_conformer and path.resolve() == in_run.resolve():
            return path, True
    if not path.is_file():
        raise FileNotFoundError(f"distillation teacher {path} does not exist: train the "
                                "Conformer first (or name another with --teacher)")
    return path, False


def train_models(archs: list[str], corpus: "dm.CorpusInfo", work_dir: Path, out_dir: Path,
                 seed: int, batch_size: int | None = None, jobs: int | None = None,
                 steps: dict[str, int] | None = None, eval_every: int = 500,
                 threads: int | None = None, distill: dict | None = None) -> dict:
    """Cache features, then train each model in its own process.

    ``threads`` (default: each model's ``HYPER`` value) is what the weights depend on:
    one thread is bit-reproducible against one thread, two against two, but not across.
    ``jobs`` is how many train at once (default: side by side only when their threads
    fit the machine's cores, else one after another, so no run steals another's core
    and each one's minutes in the card are its own).  On the 2-core machine two
    one-thread Conformer runs side by side make 5.2 steps/s together, one two-thread run
    alone 3.6 (measured 2026-11-26): the small convolutions scale poorly across threads.

    ``distill`` (``{"weight": w, "temperature": t, "teacher": path or None}``) trains the
    QuartzNet on the teacher's frame posteriors too (``demo.recipes.distill``; default teacher:
    :func:`distillation_teacher`); a Conformer trained in the same call as its student
    trains first, the QuartzNet after it.
    """
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    cache_dir = work_dir / "features"
    train_cache = cache_dir / "train.pt"
    added_cache = cache_dir / "added.pt"  # build_added removes it when it re-renders
    dev_cache = cache_dir / "dev.pt"
    train_caches = [str(train_cache)] + ([str(added_cache)] if corpus.added_manifest else [])
    steps = {**DEFAULT_STEPS, **(steps or {})}
    todo = [{"arch": a, "train_cache": train_caches, "dev_cache": str(dev_cache),
             "out": str(out_dir / f"demo_{a}.nemo"), "steps": steps[a], "seed": seed,
             "eval_every": eval_every, "log": str(work_dir / f"train_{a}.log"),
             **HYPER[a], **({"batch_size": batch_size} if batch_size else {}),
             **({"threads": threads} if threads else {})} for a in archs]
    waves = training_waves(todo, out_dir, distill)
    cache_features(corpus.train_manifest, train_cache)
    if corpus.added_manifest:
        cache_features(corpus.added_manifest, added_cache)
    cache_features(corpus.dev_manifest, dev_cache)
    infos = []
    for wave in waves:
        n = concurrent_jobs([j["threads"] for j in wave], jobs, os.cpu_count() or 1)
        for j in wave:
            j["concurrent_jobs"] = n
        with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn")) as ex:
            infos += list(ex.map(_train_child, wave))
    return {i["arch"]: i for i in infos}
