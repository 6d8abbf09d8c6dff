"""How the committed demo models were trained on a lent GPU machine (for the record).

The CPU recipe (``tools/make-demo-models``) is the supported path.  On the 2-core
development machine it was too slow (shared CPU; ~1.2-9 s per batch of 32, the CTC loss
was still at its blank plateau after 375 steps / 31 min), so the committed
``models/demo_*.nemo`` were trained with the same code (``recipes.demo_models.train``)
on a GPU machine that only accepts a 64 MiB upload.  Hence this helper:

1. ``subset`` : take a random subset of the synthetic training corpus and encode it
   as 12 kbit/s Ogg/Opus (libsndfile via soundfile, ``compression_level=1.0``) so that
   ~5 h of audio fit into ~32 MB, manifest paths relative to the subset directory;
2. ``train``  : on the GPU machine, train both models concurrently
   (``python recipes/device_train.py train --corpus DIR --minutes 6``), optionally
   continuing from earlier weights (``--init DIR`` with ``quartznet.pt`` /
   ``conformer.pt`` state dicts, written by ``export``);
3. ``export`` : write fp16 state dicts of .nemo files for ``--init``.

Stage 1 used 6400 utterances (5.1 h) from scratch for 6 min; stage 2 continued on a
disjoint subset of 5962 utterances (4.8 h) for 5 min with stronger SpecAugment.  See
the model cards for the numbers.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = {
    # stage 1: from scratch
    "scratch": {"quartznet": dict(lr=4e-3, warmup_steps=400),
                "conformer": dict(lr=2e-3, warmup_steps=600)},
    # stage 2: continue on new data, lower LR, stronger SpecAugment
    "continue": {"quartznet": dict(lr=2e-3, warmup_steps=100),
                 "conformer": dict(lr=1e-3, warmup_steps=150)},
}
CONTINUE_SPEC_AUGMENT = {"freq_masks": 2, "freq_width": 12, "time_masks": 3, "time_width": 0.05}


def make_subset(src_manifest: Path, dev_manifest: Path, dst: Path, hours: float, seed: int,
                exclude: set[str] = frozenset(), workers: int = 2) -> None:
    import soundfile as sf
    from multiprocessing import Pool
    es = [json.loads(l) for l in open(src_manifest)]
    es = [e for e in es if Path(e["audio_filepath"]).stem not in exclude]
    random.Random(seed).shuffle(es)
    sel, tot = [], 0.0
    for e in es:
        if tot + e["duration"] > hours * 3600:
            break
        sel.append(e)
        tot += e["duration"]
    jobs = [(e, dst, "train") for e in sel]
    jobs += [(json.loads(l), dst, "dev") for l in open(dev_manifest)]
    with Pool(workers) as p:
        out = p.map(_encode, jobs, chunksize=64)
    for name in ("train", "dev"):
        with open(dst / f"{name}_manifest.json", "w") as f:
            for (e, _, sub), o in zip(jobs, out):
                if sub == name:
                    f.write(json.dumps(o) + "\n")
    print(f"{len(sel)} utterances, {tot / 3600:.2f} h -> {dst}")


def _encode(job):
    import soundfile as sf
    e, dst, sub = job
    (dst / sub).mkdir(parents=True, exist_ok=True)
    name = Path(e["audio_filepath"]).stem + ".ogg"
    x, sr = sf.read(e["audio_filepath"])
    sf.write(str(dst / sub / name), x, sr, format="OGG", subtype="OPUS", compression_level=1.0)
    d = dict(e)
    d["audio_filepath"] = f"{sub}/{name}"
    return d


def export(nemo_paths: list[str], dst: Path) -> None:
    import torch
    from nemo.collections.asr.models import EncDecCTCModel
    dst.mkdir(parents=True, exist_ok=True)
    for p in nemo_paths:
        m = EncDecCTCModel.restore_from(p, map_location="cpu")
        arch = Path(p).stem.replace("demo_", "")
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in m.state_dict().items()}
        torch.save(sd, dst / f"{arch}.pt")


def _prep(corpus_dir: Path, dst: Path):
    dst.mkdir(parents=True, exist_ok=True)
    for name in ["train", "dev"]:
        with open(corpus_dir / f"{name}_manifest.json") as f, open(dst / f"{name}.json", "w") as g:
            for line in f:
                e = json.loads(line)
                e["audio_filepath"] = str((corpus_dir / e["audio_filepath"]).resolve())
                e.pop("voice", None)
                g.write(json.dumps(e) + "\n")


def _child(args):
    from recipes import demo_models as dm
    dst = Path(args.tmp)
    n = sum(1 for _ in open(dst / "train.json"))
    corpus = dm.CorpusInfo(dst / "train.json", dst / "dev.json", Path("/nonexistent"),
                           stats={"train": {"utterances": n}})
    hp = dict(STAGES["continue" if args.init else "scratch"][args.arch])
    if args.init:
        hp["init_from"] = Path(args.init) / f"{args.arch}.pt"
        hp["spec_augment"] = CONTINUE_SPEC_AUGMENT
    info = dm.train(args.arch, corpus, Path(args.out) / f"demo_{args.arch}.nemo", dst,
                    args.minutes, 0, batch_size=args.batch_size, accelerator=args.accelerator,
                    num_workers=args.workers, log_every=100, val_every=args.val_every, **hp)
    info["train_utterances"] = n
    (Path(args.out) / f"{args.arch}.json").write_text(json.dumps(info, indent=1, default=str))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("subset")
    s.add_argument("--src", default="/tmp/qpipe-demo-corpus/train_manifest.json")
    s.add_argument("--dev", default="/tmp/qpipe-demo-corpus/dev_manifest.json")
    s.add_argument("--dst", required=True)
    s.add_argument("--hours", type=float, default=5.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--exclude-from", default=None,
                   help="a train_manifest.json whose utterances must not be reused")
    e = sub.add_parser("export")
    e.add_argument("nemo", nargs="+")
    e.add_argument("--dst", required=True)
    t = sub.add_parser("train")
    t.add_argument("--corpus", required=True)
    t.add_argument("--minutes", type=float, default=6.0)
    t.add_argument("--accelerator", default="gpu")
    t.add_argument("--workers", type=int, default=6)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--val-every", type=int, default=500)
    t.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    t.add_argument("--tmp", default="/tmp/corp")
    t.add_argument("--init", default="")
    t.add_argument("--arch", default=None)
    t.add_argument("--archs", default="quartznet,conformer")
    args = ap.parse_args()
    if args.cmd == "subset":
        excl = set()
        if args.exclude_from:
            excl = {Path(json.loads(l)["audio_filepath"]).stem for l in open(args.exclude_from)}
        make_subset(Path(args.src), Path(args.dev), Path(args.dst), args.hours, args.seed, excl)
        return
    if args.cmd == "export":
        export(args.nemo, Path(args.dst))
        return
    if args.arch:
        return _child(args)
    _prep(Path(args.corpus), Path(args.tmp))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    procs = []
    for a in args.archs.split(","):
        log = open(Path(args.out) / f"{a}.log", "w")
        cmd = [sys.executable, __file__, "train", "--arch", a]
        for k, v in vars(args).items():
            if k not in ("arch", "archs", "cmd"):
                cmd += [f"--{k.replace('_', '-')}", str(v)]
        procs.append((a, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
    while any(p.poll() is None for _, p in procs):
        time.sleep(15)
    for a, p in procs:
        print(a, "rc", p.returncode, flush=True)


if __name__ == "__main__":
    main()
