"""``reference``: the integer graph as a ``torch.export`` program (``model.pt2``)
that calls the exact ``qpipe::`` integer kernels. CPU (and CUDA, op by op); slow,
and the definition of the numbers every other target must match.

Loading ``model.pt2`` needs qpipe installed (the program calls ``torch.ops.qpipe.*``).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch.fx import GraphModule

from qpipe.backends.target import SaveRecord, Target, register_target
from qpipe.ir.errors import QpipeError

MODEL_FILE = "model.pt2"


def export_integer(gm: GraphModule, example: torch.Tensor, time_dim: Optional[int] = 2) -> torch.export.ExportedProgram:
    """``torch.export`` of the integer graph, batch and time axes dynamic."""
    dims = {0: torch.export.Dim.AUTO}
    if time_dim is not None:
        dims[time_dim] = torch.export.Dim.AUTO
    try:
        return torch.export.export(gm, (example,), dynamic_shapes=(dims,), strict=False)
    except Exception as exc:
        raise QpipeError(f"could not export the integer graph: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc


def stable_provenance(ep: torch.export.ExportedProgram) -> None:
    """Number the graphs export's ``from_node`` records point to (0, 1, ... in order
    of first use) instead of their ``id()``, so the same graph saves byte-identically."""
    ids: dict[int, int] = {}

    def fix(sources) -> None:
        for src in sources or ():
            info = getattr(src, "node_info", None)
            if info is not None:
                info.graph_id = ids.setdefault(info.graph_id, len(ids))
            src._dict = None  # the cached dict holds the old id
            fix(getattr(src, "from_node", None))

    for module in ep.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in getattr(graph, "nodes", ()):
            fix(node.meta.get("from_node"))


class ReferenceRunner:
    """The loaded program; ``module`` is the plain ``nn.Module`` (e.g. to move it to CUDA)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def logits_int(self, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(features)


@register_target
class ReferenceTarget(Target):
    name = "reference"
    summary = "torch.export program of the exact qpipe:: integer kernels (model.pt2; CPU, exact, slow)"
    files = (MODEL_FILE,)

    def write(self, folder: str, gm: GraphModule, record: SaveRecord, example: torch.Tensor) -> None:
        ep = export_integer(gm, example, record.time_dim)
        stable_provenance(ep)
        torch.export.save(ep, os.path.join(folder, MODEL_FILE))

    def load(self, folder: str, meta: dict[str, Any]) -> ReferenceRunner:
        import qpipe.ir.ops  # noqa: F401  (the program calls torch.ops.qpipe.*)

        ep = torch.export.load(os.path.join(folder, MODEL_FILE))
        return ReferenceRunner(ep.module())
