"""Everything ``tools/bench/inference.py`` times, built once per model into a cache folder.

Per model, in ``CACHE/<key>/``:

    source.nemo         a config's random-weight model (``build_random_nemo``); a given .nemo stays where it is
    float.pt2           the float graph (``torch.export``, batch and time dynamic): torch fp32 eager
    float.onnx          the float model as ONNX (NeMo's module through the TorchScript exporter): ORT fp32
    qdq_int8.onnx       ``quantize_static`` QDQ, int8 activations   } calibrated on real features
    qdq_uint8.onnx      ``quantize_static`` QDQ, uint8 activations  } (held-out audio, model's featurizer)
    qpipe-<target>/     ``qpipe.api.quantize(model, output=..., target=NAME)``, one per target
    features_b<B>.npy   the timed input: B windows of 16 s of held-out audio through the model's featurizer

A qpipe folder is rebuilt when qpipe's sources changed since it was written
(``qpipe-<target>.stamp``; ``--reuse-stale`` keeps it), the float and ORT files
only when missing (or with ``--rebuild``).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEMO = os.path.join(ROOT, "models", "demo_quartznet.nemo")
HELDOUT = os.path.join(ROOT, "data", "eval", "heldout", "manifest.json")
TINY_TORCH = "torch_tiny"  # a NeMo-free toy model (tests, --quick)
SAMPLE_RATE = 16000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def qpipe_sources_hash() -> str:
    """One hash of qpipe/**/*.py: a cached qpipe folder older than the code is rebuilt."""
    h = hashlib.sha256()
    base = os.path.join(ROOT, "qpipe")
    for dirpath, dirnames, files in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, base).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:16]


def _file_key(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:10]


@dataclass
class ModelSpec:
    """What ``--models`` names: ``demo``, a .nemo path, a NeMo config name (random weights), or torch_tiny."""

    name: str
    kind: str  # "nemo" | "config" | "torch"
    source: Optional[str] = None  # the .nemo path (kind nemo)

    @property
    def random_weights(self) -> bool:
        return self.kind != "nemo"


def resolve_model(name: str) -> ModelSpec:
    from qpipe.ir.errors import QpipeError

    if name in ("demo", "demo_quartznet"):
        return ModelSpec("demo_quartznet", "nemo", DEMO)
    if name == TINY_TORCH:
        return ModelSpec(TINY_TORCH, "torch")
    if name.endswith(".nemo"):
        if not os.path.isfile(name):
            raise QpipeError(f"no such model file: {name}")
        return ModelSpec(os.path.splitext(os.path.basename(name))[0], "nemo", os.path.abspath(name))
    from qpipe.frontends.nemo_configs import CONFIGS

    if name in CONFIGS:
        return ModelSpec(name, "config")
    raise QpipeError(f"unknown model {name!r}: demo, a .nemo path, {TINY_TORCH}, or one of {', '.join(CONFIGS)}")


@dataclass
class Artifacts:
    """The files of one model (see the module docstring) and what the checks need."""

    spec: ModelSpec
    dir: str
    nemo: Optional[str]
    float_pt2: str
    float_onnx: str
    ort: dict[str, str]  # activations -> quantize_static model
    qpipe: dict[str, str] = field(default_factory=dict)  # target -> folder
    features: dict[int, str] = field(default_factory=dict)  # batch -> .npy
    feat_in: int = 64
    frames: int = 1601
    has_vocabulary: bool = False
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- a NeMo-free toy model


def tiny_torch_module():
    """QuartzNet's blocks at toy size (separable conv + BN + ReLU, a residual, a CTC head), non-default BN."""
    import torch

    class TinyCTC(torch.nn.Module):
        def __init__(self, features: int = 16, channels: int = 32, classes: int = 8):
            super().__init__()
            self.dw = torch.nn.Conv1d(features, features, 11, padding=5, groups=features, bias=False)
            self.pw = torch.nn.Conv1d(features, channels, 1, bias=False)
            self.bn1 = torch.nn.BatchNorm1d(channels)
            self.dw2 = torch.nn.Conv1d(channels, channels, 13, padding=6, groups=channels, bias=False)
            self.pw2 = torch.nn.Conv1d(channels, channels, 1, bias=False)
            self.bn2 = torch.nn.BatchNorm1d(channels)
            self.res = torch.nn.Conv1d(channels, channels, 1, bias=False)
            self.bn_res = torch.nn.BatchNorm1d(channels)
            self.head = torch.nn.Conv1d(channels, classes, 1, bias=True)

        def forward(self, x):
            h = torch.relu(self.bn1(self.pw(self.dw(x))))
            y = torch.relu(self.bn2(self.pw2(self.dw2(h))) + self.bn_res(self.res(h)))
            return torch.log_softmax(self.head(y).transpose(1, 2), dim=-1)

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = TinyCTC()
    for bn in (m.bn1, m.bn2, m.bn_res):
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.bias.data.copy_(torch.randn(c, generator=gen) * 0.1)
    return m.eval()


# --------------------------------------------------------------------------- features


def _featurizer(fm):
    from qpipe.frontends.features import make_featurizer

    return make_featurizer(fm.preprocessor, fm.featurizer_state)


def heldout_windows(featurizer, count: int, seconds: float, manifest: str = HELDOUT) -> np.ndarray:
    """``count`` windows of ``seconds`` of held-out audio (utterances end to end) as features (count, F, T).

    T is ``100 * seconds + 1`` (16 s: 1601 frames, NeMo's count for a 10 ms hop with centred
    frames); the window is featurized with 0.1 s to spare and cut to T, whatever the
    featurizer's own rounding of the last frame.
    """
    from qpipe.frontends.audio import load_audio, read_manifest

    frames = int(round(seconds * 100)) + 1
    need = int(round((seconds + 0.1) * SAMPLE_RATE))
    pieces, have, out = [], 0, []
    for item in read_manifest(manifest):
        a = load_audio(item["audio_filepath"], SAMPLE_RATE)
        pieces.append(a)
        have += len(a)
        while have >= need and len(out) < count:
            audio = np.concatenate(pieces)
            out.append(featurizer(audio[:need]).numpy()[:, :, :frames])
            pieces, have = [audio[need:]], len(audio) - need
        if len(out) == count:
            break
    if len(out) < count:
        from qpipe.ir.errors import QpipeError

        raise QpipeError(f"{manifest} has less than {count} x {seconds} s of audio")
    return np.concatenate(out, axis=0).astype(np.float32)


def _ort_module():
    """tools/bench/ort_baseline.py as a module (tools/ is no package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ort_baseline.py")
    name = "qpipe_bench_ort_baseline"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- building


def _atomic_np_save(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def write_like(first: str, out: str, gm, example, report: str, target: str) -> str:
    """Write ``gm`` as ``target`` into ``out`` with the record ``qpipe.api.quantize`` wrote into ``first``
    (its qpipe.json and frontend.pt): a second target's folder from the same pipeline run."""
    import torch

    from qpipe.backends import SaveRecord, read_meta, write_folder

    meta = read_meta(first)
    front = os.path.join(first, "frontend.pt")
    record = SaveRecord(
        pipeline=meta["pipeline"], passes=meta["passes"], source=(meta.get("source") or {}).get("path") or "",
        kind=(meta.get("source") or {}).get("kind") or "", preprocessor=meta.get("preprocessor"),
        vocabulary=meta.get("vocabulary"), time_dim=meta["input"]["time_dim"],
        time_multiple=meta["input"]["time_multiple"], input_shape=meta["input"]["shape"],
        featurizer_state=torch.load(front, weights_only=True) if os.path.isfile(front) else None,
        extra={k: meta[k] for k in ("metrics", "model_info", "loaded_passes") if k in meta})
    return write_folder(out, gm, record, example, report, target=target, force=True)


class Preparer:
    """Builds (or finds in the cache) every file of one model; the float model is loaded at most once."""

    def __init__(self, spec: ModelSpec, cache: str, *, batches: list[int], seconds: float, calib: int,
                 passes: str, rebuild: bool = False, reuse_stale: bool = False, progress: Callable[[str], None] = log):
        self.spec, self.batches, self.seconds, self.calib = spec, batches, seconds, calib
        self.passes, self.rebuild, self.reuse_stale, self.log = passes, rebuild, reuse_stale, progress
        self._fm = None
        if spec.kind == "nemo":
            key = f"{spec.name}-{_file_key(spec.source)}"
        elif spec.kind == "config":
            key = f"{spec.name}-random-seed0"
        else:
            key = spec.name
        self.dir = os.path.join(os.path.abspath(os.path.expanduser(cache)), key)
        self.features_version = 2  # bump when the timed input changes (2: cut to 100 * seconds + 1 frames)
        os.makedirs(self.dir, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    @property
    def nemo(self) -> Optional[str]:
        if self.spec.kind == "nemo":
            return self.spec.source
        if self.spec.kind == "config":
            path = self.path("source.nemo")
            if not os.path.isfile(path):
                from qpipe.frontends.nemo_configs import build_random_nemo

                self.log(f"[{self.spec.name}] building the model from NeMo's config (random weights) ...")
                build_random_nemo(self.spec.name, path + ".tmp.nemo")
                os.replace(path + ".tmp.nemo", path)
            return path
        return None

    def float_model(self):
        """qpipe's FloatModel (the NeMo import and export happen here, once)."""
        if self._fm is None:
            import qpipe.api as qp

            started = time.perf_counter()
            if self.spec.kind == "torch":
                import torch

                self.log(f"[{self.spec.name}] exporting the toy torch model ...")
                self._fm = qp.load_model(tiny_torch_module(), (torch.randn(2, 16, 64),))
            else:
                self.log(f"[{self.spec.name}] loading {self.nemo} (NeMo import + export) ...")
                self._fm = qp.load_model(self.nemo)
            self.log(f"[{self.spec.name}] float model ready in {time.perf_counter() - started:.1f} s")
        return self._fm

    def featurizer(self):
        fm = self.float_model()
        return _featurizer(fm) if (fm.featurizer_state or fm.preprocessor) else None

    def features(self) -> tuple[dict[int, str], int, int]:
        """The timed inputs, one .npy per batch size (a random-weight model hears the same audio)."""
        out = {}
        biggest = max(self.batches)
        frames = feat_in = None
        for b in self.batches:
            path = self.path(f"features_v{self.features_version}_b{b}_{self.seconds:g}s.npy")
            out[b] = path
        if self.rebuild or not all(os.path.isfile(p) for p in out.values()):
            fz = self.featurizer()
            if fz is None:  # the toy model: random features at 100 frames per second
                import torch

                g = torch.Generator().manual_seed(0)
                fm = self.float_model()
                x = torch.randn(biggest, int(fm.input_shape[1]), int(self.seconds * 100) + 1, generator=g).numpy()
            else:
                self.log(f"[{self.spec.name}] features: {biggest} x {self.seconds:g} s of held-out audio ...")
                x = heldout_windows(fz, biggest, self.seconds)
            for b, path in out.items():
                _atomic_np_save(path, np.ascontiguousarray(x[:b]))
        x1 = np.load(out[min(self.batches)], mmap_mode="r")
        feat_in, frames = int(x1.shape[1]), int(x1.shape[2])
        return out, feat_in, frames

    def float_pt2(self) -> str:
        path = self.path("float.pt2")
        if self.rebuild or not os.path.isfile(path):
            import torch

            fm = self.float_model()
            self.log(f"[{self.spec.name}] saving the float graph (float.pt2) ...")
            dims = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO}
            ep = torch.export.export(fm.gm, tuple(fm.example_inputs), dynamic_shapes=(dims,), strict=False)
            torch.export.save(ep, path[:-4] + ".tmp.pt2")
            os.replace(path[:-4] + ".tmp.pt2", path)
        return path

    def float_onnx(self) -> str:
        path = self.path("float.onnx")
        if self.rebuild or not os.path.isfile(path):
            ort = _ort_module()
            self.log(f"[{self.spec.name}] exporting the float model to ONNX ...")
            tmp = path + ".tmp.onnx"
            if self.spec.kind == "torch":
                import torch

                ort.export_module_onnx(tiny_torch_module(), torch.randn(1, 16, 64), tmp)
            else:
                ort.export_nemo_onnx(self.nemo, tmp)
            os.replace(tmp, path)
        return path

    def calibration(self) -> list[np.ndarray]:
        fz = self.featurizer()
        if fz is None:
            import torch

            g = torch.Generator().manual_seed(1)
            fm = self.float_model()
            return [torch.randn(1, int(fm.input_shape[1]), 400, generator=g).numpy() for _ in range(self.calib)]
        from qpipe.frontends.audio import read_manifest

        return [fz.file(item["audio_filepath"]).numpy() for item in read_manifest(HELDOUT)[: self.calib]]

    def ort_models(self, float_onnx: str) -> dict[str, str]:
        ort = _ort_module()
        out = {act: self.path(f"qdq_{act}.onnx") for act in ort.ACTIVATIONS}
        missing = [a for a, p in out.items() if self.rebuild or not os.path.isfile(p)]
        if missing:
            self.log(f"[{self.spec.name}] calibration features for quantize_static ({self.calib} held-out utterances) ...")
            feats = self.calibration()
            for act in missing:
                self.log(f"[{self.spec.name}] quantize_static QDQ, {act} activations ...")
                tmp = out[act] + ".tmp.onnx"
                info = ort.quantize_qdq(float_onnx, tmp, feats, act)
                os.replace(tmp, out[act])
                with open(out[act] + ".json", "w") as f:
                    json.dump(info, f)
        return out

    def _fresh(self, folder: str, want: dict[str, Any]) -> bool:
        stamp = folder + ".stamp"
        if self.rebuild or not os.path.isdir(folder) or not os.path.isfile(stamp):
            return False
        with open(stamp) as f:
            have = json.load(f)
        if have == want:
            return True
        if self.reuse_stale and have.get("passes") == want["passes"]:
            self.log(f"[{self.spec.name}] {os.path.basename(folder)}: reusing a folder written by older qpipe sources (--reuse-stale)")
            return True
        return False

    def qpipe_folders(self, targets: list[str]) -> dict[str, str]:
        """target -> cached folder. When any is missing or older than qpipe's sources, the pipeline runs
        once (``qpipe.api.quantize`` into the first target's folder) and every target is written from
        that one integer graph, so the targets compare the same numbers. Unknown or unavailable
        targets: one line each, skipped."""
        from qpipe.backends import check_available, get_target
        from qpipe.ir.errors import QpipeError

        usable = []
        for t in targets:
            try:
                check_available(get_target(t))
                usable.append(t)
            except QpipeError as exc:
                self.log(f"[{self.spec.name}] skipping qpipe {t}: {exc}")
        want = {"sources": qpipe_sources_hash(), "passes": self.passes}
        folders = {t: self.path(f"qpipe-{t}") for t in usable}
        if not usable or all(self._fresh(f, want) for f in folders.values()):
            return folders
        import qpipe.api as qp

        first, rest = usable[0], usable[1:]
        self.log(f"[{self.spec.name}] quantizing with qpipe ({self.passes}) for {', '.join(usable)} "
                 f"(one pipeline run; minutes for a large model) ...")
        started = time.perf_counter()
        try:
            result = qp.quantize(self.float_model(), passes=self.passes, output=folders[first], target=first,
                                 force=True, progress=False, log=lambda m: self.log(f"[{self.spec.name}]   {m}"))
        except QpipeError as exc:
            self.log(f"[{self.spec.name}] skipping qpipe {', '.join(usable)}: {exc}")
            return {}
        self._stamp(folders[first], want, first)
        self.log(f"[{self.spec.name}] qpipe {first} written in {time.perf_counter() - started:.0f} s")
        out = {first: folders[first]}
        for t in rest:
            try:
                write_like(folders[first], folders[t], result.gm, result.float_model.example_inputs[0],
                           result.report, t)
            except QpipeError as exc:
                self.log(f"[{self.spec.name}] skipping qpipe {t}: {exc}")
                continue
            self._stamp(folders[t], want, first)
            out[t] = folders[t]
            self.log(f"[{self.spec.name}] qpipe {t} written from the same integer graph")
        return out

    @staticmethod
    def _stamp(folder: str, want: dict[str, Any], run_of: str) -> None:
        with open(folder + ".stamp", "w") as f:
            json.dump(want, f)
        with open(folder + ".run", "w") as f:  # which folder's pipeline run this one was written from
            f.write(run_of + "\n")

    def build(self, targets: list[str], need_ort: bool = True) -> Artifacts:
        features, feat_in, frames = self.features()
        float_onnx = self.float_onnx()
        art = Artifacts(self.spec, self.dir, self.nemo, self.float_pt2(), float_onnx,
                        self.ort_models(float_onnx) if need_ort else {}, features=features,
                        feat_in=feat_in, frames=frames)
        art.qpipe = self.qpipe_folders(targets)
        want = {"sources": qpipe_sources_hash(), "passes": self.passes}
        for t, folder in art.qpipe.items():
            from qpipe.backends import read_meta

            with open(folder + ".stamp") as f:
                have = json.load(f)
            run_of = open(folder + ".run").read().strip() if os.path.isfile(folder + ".run") else t
            art.info.setdefault("qpipe_folders", {})[t] = {
                "created": read_meta(folder).get("created"), "qpipe_sources": have.get("sources"),
                "stale": have != want, "pipeline_run_of": run_of}
        if art.qpipe:
            from qpipe.backends import read_meta

            art.has_vocabulary = bool(read_meta(next(iter(art.qpipe.values()))).get("vocabulary"))
        return art
