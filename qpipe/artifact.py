"""The quantized model on disk: ``OUT/`` with the integer program, a reproduction
record and a short report. Written atomically: a failed run leaves no OUT.

    OUT/model.pt2      torch.export program of the integer graph (qpipe:: ops; needs qpipe installed to load)
    OUT/qpipe.json     pipeline with every option, seeds, per-node scales, versions, the model's preprocessor and vocabulary
    OUT/ir.txt         the printed integer IR, with provenance
    OUT/report.txt     a short human summary
    OUT/frontend.pt    the float mel front end (filterbank, window, settings) for transcription
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.fx import GraphModule

from qpipe import __version__
from qpipe.ir.errors import QpipeError
from qpipe.ir.meta import PROVENANCE, QPARAMS, QPOLICY
from qpipe.ir.printer import SymbolNames, dtype_name, print_ir, target_name

FORMAT = "qpipe-int8/1"


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


def export_integer(gm: GraphModule, example: torch.Tensor, time_dim: Optional[int] = 2) -> torch.export.ExportedProgram:
    dims = {0: torch.export.Dim.AUTO}
    if time_dim is not None:
        dims[time_dim] = torch.export.Dim.AUTO
    try:
        return torch.export.export(gm, (example,), dynamic_shapes=(dims,), strict=False)
    except Exception as exc:
        raise QpipeError(f"could not export the integer graph: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc


@dataclass
class SaveRecord:
    pipeline: str
    passes: list[dict[str, Any]]
    source: str
    kind: str
    preprocessor: Optional[dict[str, Any]]
    vocabulary: Optional[list[str]]
    time_dim: Optional[int]
    time_multiple: int
    input_shape: list[int]
    featurizer_state: Optional[dict[str, Any]] = None
    extra: dict[str, Any] = field(default_factory=dict)


def save(out_dir: str, gm: GraphModule, record: SaveRecord, example: torch.Tensor, report: str, force: bool = False) -> str:
    """Write OUT atomically (into a temp folder beside it, renamed at the end)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not force:
        if not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
            raise QpipeError(f"output {out_dir} already exists (use --force to replace it)")
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise QpipeError(f"cannot write {out_dir}: cannot create folder {parent}: {exc.strerror}") from None
    ep = export_integer(gm, example, record.time_dim)
    tmp = tempfile.mkdtemp(prefix=".qpipe-tmp-", dir=parent)
    try:
        torch.export.save(ep, os.path.join(tmp, "model.pt2"))
        if record.featurizer_state:
            torch.save(record.featurizer_state, os.path.join(tmp, "frontend.pt"))
        meta = {
            "format": FORMAT,
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


def _optional_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("nemo_toolkit", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def is_artifact(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "qpipe.json"))


@dataclass
class QuantizedModel:
    """A loaded ``OUT/``: the integer program plus what it needs to transcribe."""

    path: str
    meta: dict[str, Any]
    _module: Optional[torch.nn.Module] = None

    @property
    def module(self) -> torch.nn.Module:
        if self._module is None:
            import qpipe.ir.ops  # noqa: F401  (the program calls torch.ops.qpipe.*)

            ep = torch.export.load(os.path.join(self.path, "model.pt2"))
            self._module = ep.module()
        return self._module

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
        return float(self.meta["outputs"][0]["scale"])

    def logits_int(self, features: torch.Tensor) -> torch.Tensor:
        """Integer logits (B, T', V) for float features (B, F, T)."""
        multiple = int(self.meta["input"].get("time_multiple", 1) or 1)
        t = (features.shape[2] // multiple) * multiple
        with torch.no_grad():
            return self.module(features[:, :, :t].contiguous())


def load(path: str) -> QuantizedModel:
    if not is_artifact(path):
        raise QpipeError(f"{path} is not a qpipe output folder (no qpipe.json)")
    with open(os.path.join(path, "qpipe.json"), encoding="utf-8") as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as exc:
            raise QpipeError(f"{path}/qpipe.json is corrupt: {exc}") from None
    if meta.get("format") != FORMAT:
        raise QpipeError(f"{path}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    if not os.path.isfile(os.path.join(path, "model.pt2")):
        raise QpipeError(f"{path}: model.pt2 is missing")
    return QuantizedModel(os.path.abspath(path), meta)
