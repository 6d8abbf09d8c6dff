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
from typing import Any, Optional

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


def check_writable(out_dir: str, force: bool = False) -> None:
    """Fail early (before any slow work) when OUT exists and may not be replaced."""
    if os.path.exists(out_dir) and not force and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise QpipeError(f"output {out_dir} already exists (use --force to replace it)")


def write_folder(
    out_dir: str,
    gm: GraphModule,
    record: SaveRecord,
    example: torch.Tensor,
    report: str,
    target: str | Target = DEFAULT_TARGET,
    force: bool = False,
) -> str:
    """Write OUT for ``target`` atomically (into a temp folder beside it, renamed at the end)."""
    tgt = get_target(target) if isinstance(target, str) else target
    check_available(tgt)
    out_dir = os.path.abspath(out_dir)
    check_writable(out_dir, force)
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise QpipeError(f"cannot write {out_dir}: cannot create folder {parent}: {exc.strerror}") from None
    tmp = tempfile.mkdtemp(prefix=".qpipe-tmp-", dir=parent)
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
            "input": {"shape": record.input_shape, "time_dim": record.time_dim, "time_multiple": record.time_multiple},
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
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


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
            state = torch.load(path, weights_only=True)
        return make_featurizer(self.meta.get("preprocessor"), state)

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
        with torch.no_grad():
            return self.runner.logits_int(features[:, :, :t].contiguous())


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
