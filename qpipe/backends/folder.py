"""An output folder ``OUT/``, whatever the target: written atomically (a failed
run leaves no OUT), opened by reading ``qpipe.json`` and asking its target.

    OUT/qpipe.json     format, target, pipeline with every option, per-pass times and stats,
                       seeds, per-node scales, versions, the model's preprocessor and vocabulary
    OUT/ir.txt         the printed integer IR, with provenance
    OUT/report.txt     a short human summary
    OUT/frontend.pt    the float mel front end (filterbank, window, settings) for transcription
    OUT/...            the target's model files (``reference``: model.pt2)

A folder written before targets existed has no ``"target"`` key; it is a
``reference`` folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.fx import GraphModule

from qpipe import __version__
from qpipe.backends.target import Runner, SaveRecord, Target, check_available, get_target, list_targets
from qpipe.ir.errors import QpipeError
from qpipe.ir.meta import PROVENANCE, QPARAMS, QPOLICY
from qpipe.ir.printer import SymbolNames, dtype_name, print_ir, target_name

FORMAT = "qpipe-int8/1"
DEFAULT_TARGET = "reference"  # what a folder without a "target" key was written for


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist() if v.numel() <= 4096 else {"shape": list(v.shape), "first": v.flatten()[:8].tolist()}
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def node_table(gm: GraphModule) -> list[dict[str, Any]]:
    """One row per compute node: op, output dtype/shape, policy, qparams, provenance."""
    rows = []
    syms = SymbolNames(gm)
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_module", "placeholder"):
            continue
        val = node.meta.get("val")
        shape = [syms.fmt_dim(d) for d in val.shape] if isinstance(val, torch.Tensor) else None
        rows.append(
            {
                "name": node.name,
                "op": target_name(node),
                "dtype": dtype_name(val.dtype) if isinstance(val, torch.Tensor) else None,
                "shape": shape,
                "policy": _jsonable(node.meta.get(QPOLICY, {})),
                "qparams": _jsonable(node.meta.get(QPARAMS, {})),
                "from": list(node.meta.get(PROVENANCE, [])),
            }
        )
    return rows


def file_sha256(path: str) -> Optional[str]:
    if not path or not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _optional_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("nemo_toolkit", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _first_existing(path: str) -> str:
    while not os.path.exists(path):
        up = os.path.dirname(path)
        if up == path:
            break
        path = up
    return path


def check_writable(out_dir: str, force: bool = False) -> None:
    """Fail early (before any slow work) when OUT cannot be written.

    OUT that exists may be replaced with ``force`` (an empty folder always); OUT
    that is a file never is (``-o`` names a folder). The nearest folder above OUT
    that exists must be a folder: a file in the way is said now, not after the run.
    Whether the file system lets us write is found out by :class:`OutputSlot`,
    which makes the temp folder.
    """
    out = os.path.abspath(out_dir)
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise QpipeError(f"output {out_dir} is a file, not a folder (-o names a folder to write)")
        if not force and os.listdir(out):
            raise QpipeError(f"output {out_dir} already exists (use --force to replace it)")
    above = _first_existing(os.path.dirname(out))
    if not os.path.isdir(above):
        raise QpipeError(f"cannot write {out_dir}: {above} is a file, not a folder")


def _os_reason(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()


class OutputSlot:
    """OUT's temporary folder beside it, made first, so that an output that cannot be
    written (read-only file system, no permission, a file in the way) fails before
    the model is loaded. :func:`write_folder` fills it and renames it to OUT;
    :meth:`discard` (or leaving the ``with`` block by an exception, Ctrl-C too)
    removes it and any parent folders it made, so a failed run writes nothing.
    """

    def __init__(self, out_dir: str, force: bool = False):
        check_writable(out_dir, force)
        self.given = out_dir
        self.out_dir = os.path.abspath(out_dir)
        self.force = force
        self._made: list[str] = []
        parent = os.path.dirname(self.out_dir)
        missing = []
        p = parent
        while not os.path.exists(p):
            missing.append(p)
            p = os.path.dirname(p)
        where = parent
        try:
            for d in reversed(missing):
                where = d
                os.mkdir(d)
                self._made.append(d)
            where = parent
            self.tmp = tempfile.mkdtemp(prefix=".qpipe-tmp-", dir=parent)
        except OSError as exc:
            self._remove_made()
            raise QpipeError(f"cannot write {out_dir}: {_os_reason(exc)} ({where})") from None

    def _remove_made(self) -> None:
        for d in reversed(self._made):
            try:
                os.rmdir(d)
            except OSError:
                pass
        self._made = []

    def discard(self) -> None:
        if getattr(self, "tmp", None):
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = ""
        self._remove_made()

    def commit(self) -> str:
        """Replace OUT by the filled temp folder (OUT is checked again: it may have appeared meanwhile)."""
        check_writable(self.out_dir, self.force)
        if os.path.exists(self.out_dir):
            shutil.rmtree(self.out_dir)
        os.chmod(self.tmp, 0o755)
        os.replace(self.tmp, self.out_dir)
        self.tmp = ""
        self._made = []
        return self.out_dir

    def __enter__(self) -> "OutputSlot":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()


def min_time_of(gm: GraphModule, time_dim: Optional[int]) -> Optional[int]:
    """The fewest time steps the graph takes: the lower bound export derived for the
    input's time axis (a conv stack's guard, e.g. ``T >= 5``), so that too-short audio
    is refused in words before the program's guard fails."""
    if time_dim is None:
        return None
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() <= time_dim:
            return None
        dim = val.shape[time_dim]
        if isinstance(dim, int):
            return int(dim)
        try:
            lower = dim.node.shape_env.bound_sympy(dim.node.expr).lower
            return int(lower) if str(lower).lstrip("-").isdigit() else None
        except Exception:  # a shape env torch does not expose as expected: no minimum recorded
            return None
    return None


# Fields of qpipe.json that say when and how fast a run was, not what it produced.
TIMING_FIELDS = ("created", "passes[].seconds", "passes[].verify_seconds",
                 "metrics.load_seconds", "metrics.pipeline_seconds", "metrics.verify_seconds")


def without_timing(meta: dict[str, Any]) -> dict[str, Any]:
    """``qpipe.json`` without :data:`TIMING_FIELDS`: equal for two runs of the same model, pipeline and seed."""
    out = json.loads(json.dumps(meta))
    out.pop("created", None)
    for rec in out.get("passes") or []:
        rec.pop("seconds", None)
        rec.pop("verify_seconds", None)
    for key in ("load_seconds", "pipeline_seconds", "verify_seconds"):
        (out.get("metrics") or {}).pop(key, None)
    return out


def write_folder(
    out_dir: str,
    gm: GraphModule,
    record: SaveRecord,
    example: torch.Tensor,
    report: str,
    target: str | Target = DEFAULT_TARGET,
    force: bool = False,
    slot: Optional[OutputSlot] = None,
    finish: Optional[Callable[[str, str], Any]] = None,
) -> str:
    """Write OUT for ``target`` atomically (into a temp folder beside it, renamed at the end).

    ``slot``: the temp folder made before the slow work (:class:`OutputSlot`); without
    one it is made now. ``finish(temp_folder, out_dir)`` adds files that read the written ones
    (the app's report.html) before the rename, so they are part of the atomic write.
    """
    tgt = get_target(target) if isinstance(target, str) else target
    check_available(tgt)
    slot = slot if slot is not None else OutputSlot(out_dir, force)
    tmp = slot.tmp
    try:
        tgt.write(tmp, gm, record, example)
        if record.featurizer_state:
            torch.save(record.featurizer_state, os.path.join(tmp, "frontend.pt"))
        meta = {
            "format": FORMAT,
            "target": tgt.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "pipeline": record.pipeline,
            "passes": record.passes,
            "source": {"path": record.source, "sha256": file_sha256(record.source), "kind": record.kind},
            "input": {"shape": record.input_shape, "time_dim": record.time_dim, "time_multiple": record.time_multiple,
                      "min_time": min_time_of(gm, record.time_dim)},
            "outputs": _jsonable(gm.meta.get("qpipe_outputs", [])),
            "float_tail": gm.meta.get("qpipe_float_tail", []),
            "preprocessor": record.preprocessor,
            "vocabulary": record.vocabulary,
            "versions": {
                "qpipe": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
                **_optional_versions(),
            },
            "nodes": node_table(gm),
            **_jsonable(record.extra),
        }
        with open(os.path.join(tmp, "qpipe.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        with open(os.path.join(tmp, "ir.txt"), "w", encoding="utf-8") as f:
            f.write(print_ir(gm, with_provenance=True, include_params=False))
        with open(os.path.join(tmp, "report.txt"), "w", encoding="utf-8") as f:
            f.write(report)
        if finish is not None:
            finish(tmp, os.path.abspath(out_dir))
        return slot.commit()
    except OSError as exc:
        slot.discard()
        raise QpipeError(f"cannot write {out_dir}: {_os_reason(exc)} ({exc.filename or tmp})") from None
    except BaseException:
        slot.discard()
        raise


# --------------------------------------------------------------------------- opening


def is_output_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "qpipe.json"))


def read_meta(path: str) -> dict[str, Any]:
    """``qpipe.json`` of an output folder, its format checked (the target is not needed)."""
    if not is_output_folder(path):
        raise QpipeError(f"{path} is not a qpipe output folder (no qpipe.json)")
    with open(os.path.join(path, "qpipe.json"), encoding="utf-8") as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as exc:
            raise QpipeError(f"{path}/qpipe.json is corrupt: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise QpipeError(f"{path}: unknown format {found!r} (expected {FORMAT})")
    return meta


@dataclass
class QuantizedModel:
    """An opened ``OUT/``: its ``qpipe.json``, its target, and what it needs to transcribe.

    The target's runner is loaded on first use (``runner``, ``logits_int``), so
    reading an output folder's facts needs neither its model files nor its runtime.
    """

    path: str
    meta: dict[str, Any]
    target: Target
    _runner: Optional[Runner] = None

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            check_available(self.target)
            try:
                self._runner = self.target.load(self.path, self.meta)
            except QpipeError:
                raise
            except Exception as exc:
                first = str(exc).splitlines()[0] if str(exc) else ""
                files = ", ".join(self.target.files) or f"the {self.target.name} model"
                raise QpipeError(f"{self.path}: cannot load {files}: {type(exc).__name__}: {first}") from exc
        return self._runner

    def featurizer(self):
        """Audio -> features as the float model computed them (no NeMo when frontend.pt exists)."""
        from qpipe.frontends.features import make_featurizer

        state = None
        path = os.path.join(self.path, "frontend.pt")
        if os.path.isfile(path):
            try:
                state = torch.load(path, weights_only=True)
            except Exception as exc:
                raise QpipeError(f"{path} is corrupt: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}") from None
        return make_featurizer(self.meta.get("preprocessor"), state, min_frames=self.min_frames)

    @property
    def min_frames(self) -> int:
        """The fewest feature frames this model takes: its program's lower bound on T
        (``input.min_time``; 2 for folders written before it was recorded), rounded up
        to the time multiple the frames are cut to."""
        inp = self.meta.get("input", {}) or {}
        multiple = int(inp.get("time_multiple", 1) or 1)
        least = max(2, int(inp.get("min_time") or 2), multiple)
        return -(-least // multiple) * multiple

    @property
    def output_scale(self) -> float:
        """Integer logits times this are the model's log-probabilities."""
        return float(self.meta["outputs"][0]["scale"])

    @property
    def vocabulary(self) -> list[str]:
        return list(self.meta.get("vocabulary") or [])

    def logits_int(self, features: torch.Tensor) -> torch.Tensor:
        """Integer logits (B, T', V) for float features (B, F, T); T is cut to the model's time multiple."""
        multiple = int(self.meta.get("input", {}).get("time_multiple", 1) or 1)
        t = (features.shape[2] // multiple) * multiple
        if t < self.min_frames:
            raise QpipeError(f"input too short: {features.shape[2]} feature frames; this model needs at least {self.min_frames}")
        with torch.no_grad():
            try:
                return self.runner.logits_int(features[:, :, :t].contiguous())
            except Exception as exc:  # a folder without input.min_time: the program's own guard
                if "Guard failed" not in str(exc) and "guard" not in str(exc).lower():
                    raise
                raise QpipeError(f"input of {t} feature frames rejected by the model: {str(exc).splitlines()[0]}") from None


def open_folder(path: str) -> QuantizedModel:
    """Read ``qpipe.json``, check its format, find its target, check the target's files are there."""
    meta = read_meta(path)
    name = meta.get("target", DEFAULT_TARGET)
    try:
        target = get_target(name)
    except QpipeError:
        known = ", ".join(t.name for t in list_targets()) or "none"
        raise QpipeError(f"{path} was written for target '{name}', which this qpipe does not have (targets: {known})") from None
    for fname in target.files:
        if not os.path.isfile(os.path.join(path, fname)):
            raise QpipeError(f"{path}: {fname} is missing")
    return QuantizedModel(os.path.abspath(path), meta, target)
