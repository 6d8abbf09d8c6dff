"""Any ``nn.Module`` (with example inputs) or an ``ExportedProgram`` -> FloatModel."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch.fx import GraphModule

from qpipe.frontends.hops import inline_disabled_autocast
from qpipe.frontends.model import FloatModel
from qpipe.ir.errors import QpipeError
from qpipe.ir.graph_utils import prune_to_outputs


_FUNCTIONAL = {
    torch.ops.aten.relu_.default: torch.ops.aten.relu.default,
    torch.ops.aten.hardtanh_.default: torch.ops.aten.hardtanh.default,
    torch.ops.aten.add_.Tensor: torch.ops.aten.add.Tensor,
    torch.ops.aten.mul_.Tensor: torch.ops.aten.mul.Tensor,
    torch.ops.aten.clamp_.default: torch.ops.aten.clamp.default,
}


def graph_from_exported(ep: torch.export.ExportedProgram) -> GraphModule:
    """Unlift parameters into ``get_attr`` nodes, drop export's runtime guard call and
    dead bookkeeping, and make in-place activations functional.

    Passes then see weights as module attributes they can read and replace, and
    every call node keeps the ``meta["val"]`` fake tensors that export computed.
    """
    gm = ep.module()
    inline_disabled_autocast(gm)  # NeMo's squeeze-excite runs inside autocast(enabled=False)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _FUNCTIONAL:
            node.target = _FUNCTIONAL[node.target]
    prune_to_outputs(gm)
    for name in [n for n, _ in gm.named_children() if n.startswith("_guards_fn")]:
        delattr(gm, name)
    gm.graph.lint()
    gm.recompile()
    dim_names: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            shape = list(getattr(val, "shape", ()))
            for i, d in enumerate(shape):
                if not isinstance(d, int):
                    name = "B" if i == 0 and len(shape) > 1 else ("T" if i == len(shape) - 1 else f"D{i}")
                    for sym in d.node.expr.free_symbols:
                        if str(sym) not in dim_names:
                            taken = set(dim_names.values())
                            dim_names[str(sym)] = name if name not in taken else f"{name}{len(taken)}"
    gm.meta["qpipe_dim_names"] = dim_names
    return gm


def from_exported_program(ep: torch.export.ExportedProgram, example_inputs: Optional[Sequence[torch.Tensor]] = None, **kw: Any) -> FloatModel:
    if example_inputs is None:
        example_inputs = tuple(
            torch.zeros([int(d) if isinstance(d, int) else 64 for d in n.meta["val"].shape], dtype=n.meta["val"].dtype)
            for n in ep.graph.nodes
            if n.op == "placeholder" and n.name not in ep.graph_signature.inputs_to_parameters
            and n.name not in ep.graph_signature.inputs_to_buffers
        )
    return FloatModel(graph_from_exported(ep), tuple(example_inputs), **kw)


def from_module(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    dynamic_time: bool = True,
    time_dim: int = 2,
    time_multiple: int = 1,
    max_time: int = 16384,
    **kw: Any,
) -> FloatModel:
    """Export ``module`` in eval mode; the time axis of the first input stays dynamic."""
    module = module.eval()
    example_inputs = tuple(example_inputs)
    dynamic_shapes = None
    if dynamic_time:
        # AUTO lets export derive the range (and a multiple, for subsampling
        # encoders) from the model's own guards; the bounds are read back below.
        dynamic_shapes = ({0: torch.export.Dim.AUTO, time_dim: torch.export.Dim.AUTO},) + tuple(
            None for _ in example_inputs[1:]
        )
    try:
        ep = torch.export.export(module, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        raise QpipeError(f"torch.export failed for {type(module).__name__}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    if dynamic_time:
        uppers = [int(r.upper) for r in ep.range_constraints.values() if str(r.upper).isdigit()]
        if uppers:
            max_time = min(max_time, *[u for u in uppers if u > 1]) if any(u > 1 for u in uppers) else max_time
    return FloatModel(
        graph_from_exported(ep),
        example_inputs,
        time_dim=time_dim if dynamic_time else None,
        time_multiple=time_multiple,
        max_time=max_time,
        **kw,
    )
