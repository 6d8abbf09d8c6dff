"""Shared mechanics of the calibrate-* passes: run batches, turn ranges into qparams.

Each calibrate pass differs only in where its input batches come from
(synthetic distillation, real audio, noise); this module fills the observers
and copies what they measured into ``meta["qparams"]`` of each observer node.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch.fx import GraphModule, Node

from qpipe.ir.meta import QPARAMS, QPOLICY
from qpipe.ir.observer import ActObserver
from qpipe.ir.state import PipelineState


def observer_nodes(gm: GraphModule) -> list[tuple[Node, ActObserver]]:
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, ActObserver):
                out.append((node, mod))
    return out


def run_graph(gm: GraphModule, x: torch.Tensor) -> object:
    with torch.no_grad():
        return gm(x)


def calibrate_from_batches(gm: GraphModule, batches: Iterable[torch.Tensor], source: str) -> dict:
    """Record ranges on ``batches``, set each observer's scale, then count saturation.

    Returns stats for the pass result: observers filled, mean saturation share.
    """
    batches = list(batches)
    obs = observer_nodes(gm)
    for node, mod in obs:  # the node's policy is the truth; a user pass may have changed it
        policy = node.meta[QPOLICY]
        mod.bits, mod.method, mod.percentile = policy.bits, policy.method, float(policy.percentile)
        mod.unsigned = bool(getattr(policy, "unsigned", False))
        mod.reset()
        mod.recording, mod.counting_scale = True, None
    for x in batches:
        run_graph(gm, x)
    for node, mod in obs:
        mod.recording = False
        mod.counting_scale = mod.scale()
    for x in batches:  # second pass: how much of each tensor the chosen range clips
        run_graph(gm, x)
    shares = []
    for node, mod in obs:
        share = mod.saturated / max(mod.total, 1)
        shares.append(share)
        node.meta[QPARAMS] = {
            "scale": mod.scale(),
            "amax": mod.range_amax(),
            "min": min(mod.mins),
            "max": max(mod.maxs),
            "saturation": share,
            "calibration": source,
        }
        mod.counting_scale = None
    return {
        "observers": len(obs),
        "batches": len(batches),
        "mean_saturation": round(sum(shares) / max(len(shares), 1), 6),
    }


def input_shape(gm: GraphModule, state: PipelineState, batch: int, length: int) -> tuple[int, ...]:
    """The (batch, features, time) shape for calibration inputs, time rounded to the model's multiple.

    Taken from the frontend's example input when known, else from the graph's
    first input (its symbolic batch and time dimensions replaced).
    """
    val = next(n for n in gm.graph.nodes if n.op == "placeholder").meta.get("val")
    shape = state.input_shape
    if shape is None:
        if not isinstance(val, torch.Tensor):
            raise ValueError("cannot tell the model's input shape; give the frontend an example input")
        shape = [d if isinstance(d, int) else 1 for d in val.shape]
    shape = list(shape)
    if isinstance(val, torch.Tensor) and isinstance(val.shape[0], int):
        batch = val.shape[0]  # export fixed the batch size: calibrate with that one
    time_dim = state.time_dim
    multiple = int(state.time_multiple or 1)
    shape[0] = batch
    if time_dim is not None:
        shape[time_dim] = max(multiple, (length // multiple) * multiple)
    return tuple(shape)
