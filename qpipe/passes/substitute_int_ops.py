"""substitute-int-ops: replace float compute with qpipe:: integer ops at the observed scales."""
from __future__ import annotations

import numpy as np
import torch
from torch.fx import GraphModule, Node

from qpipe.ir.errors import QpipeError
from qpipe.ir.meta import QPARAMS, QPOLICY, source_name
from qpipe.ir.observer import ActObserver
from qpipe.ir.passes import Opt, PassContext, PassResult, register
from qpipe.ir.printer import target_name
from qpipe.ir.qtype import QType
from qpipe.ir.stages import Stage
from qpipe.passes.lower import Lowering, families, family_of
from qpipe.passes.lower.context import calibration_facts, observer_of


def _quantize_input(lw: Lowering, node: Node) -> None:
    obs = observer_of(lw.gm, node)
    if obs is None:
        return
    scale = float(np.float32(obs.meta[QPARAMS]["scale"]))  # the quantizer divides in float32 (ops/quantize.py)
    bits = int(obs.meta[QPOLICY].bits)
    facts = calibration_facts(obs)
    qn = lw.emit(obs.next, torch.ops.qpipe.quantize.default, {"x": node, "scale": float(scale), "bits": bits}, node,
                 QType.of(bits, scale), {"scale": scale, "bits": bits, **facts})
    lw.bind(node, qn)
    lw.bind(obs, qn)
    lw.count("quantize")


@register("substitute-int-ops", needs=Stage.CALIBRATED, leaves=Stage.INTEGER,
          options={"requant": Opt("f32", choices=("f32", "dyadic"))})
def substitute_int_ops(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Replace each float op of a known family with qpipe:: integer ops (conv, linear, residual add, ReLU/clamp).

    Weights become int8 per output channel, biases int32 at S_x*S_w, each
    accumulator is requantized to its observed output scale by a dyadic (m, s)
    pair; a ReLU read by one producer is folded into that requantization's clamp.
    Each op family's handler (qpipe/passes/lower/) does its part; old float nodes
    are left dead for eliminate-dead-float.

    ``requant``: how an 8-bit conv / linear output is requantized. ``f32`` (the
    default): by the float32 multiplier ``fl32(fl32(S_x*S_w)/S_y)``, rounded as
    float32 arithmetic rounds (emulated in integers: ``ops/kernels.py``), which is
    what ONNX Runtime's fused QLinearConv / QGemm and a float32 GPU epilogue
    compute, so those backends are the reference's integers by construction.
    ``dyadic``: the 31-bit ``(acc*m + 2**(s-1)) >> s`` of Q-ASR (for integer
    hardware without float units; ONNX Runtime then matches it only where a
    float32 scale rounds alike). Every other requantization is dyadic.
    """
    lw = Lowering(gm)
    lw.requant_rounding = str(ctx.options["requant"])
    lw.stats = {"quantize": 0, **{f.name: 0 for f in families()}}
    unsupported = []
    for node in list(gm.graph.nodes):
        if node.op == "placeholder":
            _quantize_input(lw, node)
        elif node.op in ("get_attr", "output"):
            continue
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), ActObserver):
            if node.args[0] in lw.int_of:
                lw.bind(node, lw.int_of[node.args[0]])
        elif not any(isinstance(a, Node) and a in lw.int_of for a in node.all_input_nodes):
            continue  # not fed by the quantized region (e.g. shape arithmetic)
        elif (family := family_of(node)) is not None:
            family.lower(node, lw)
        else:
            unsupported.append(f"%{node.name} = {target_name(node)} (from {source_name(node)})")
    if unsupported:
        raise QpipeError(
            f"no integer kernel for {len(unsupported)} op(s) (this model kind is not supported yet):\n  "
            + "\n  ".join(unsupported[:20])
        )
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outputs_meta = []

    def remap(arg):
        if isinstance(arg, Node):
            if arg not in lw.int_of:
                raise QpipeError(f"graph output %{arg.name} ({source_name(arg)}) is not quantized")
            new = lw.int_of[arg]
            q = lw.qtype(new)
            outputs_meta.append({"scale": q.scale, "bits": q.bits})
            return new
        if isinstance(arg, (list, tuple)):
            return type(arg)(remap(a) for a in arg)
        return arg

    output.args = tuple(remap(a) for a in output.args)
    for node in [n for n in gm.graph.nodes if n.op == "call_module"]:
        if isinstance(gm.get_submodule(node.target), ActObserver):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.meta["qpipe_outputs"] = outputs_meta
    gm.meta["qpipe_float_tail"] = lw.tail_ops
    return PassResult(gm, True, lw.stats)
