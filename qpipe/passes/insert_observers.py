"""insert-observers: decide what gets quantized how, and observe the activations."""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from qpipe.ir.errors import QpipeError
from qpipe.ir.meta import QPOLICY, set_provenance
from qpipe.ir.observer import ActObserver
from qpipe.ir.passes import PassContext, PassResult, register
from qpipe.ir.stages import Stage
from qpipe.passes.ops_table import (
    ACTIVATION_OPS,
    ADD_OPS,
    CONV_OPS,
    LINEAR_OPS,
    TAIL_OPS,
    TRANSPARENT,
    is_call,
    unsupported_ops,
)
from qpipe.ir.graph_utils import users_through


def parse_act_method(text: str) -> tuple[str, float]:
    """``minmax`` or ``percentile:99.99`` -> (method, percentile)."""
    if text == "minmax":
        return "minmax", 100.0
    if text.startswith("percentile"):
        _, _, value = text.partition(":")
        try:
            p = float(value or "99.99")
        except ValueError:
            raise QpipeError(f"act={text}: percentile must be a number, e.g. percentile:99.99") from None
        if not 50.0 < p <= 100.0:
            raise QpipeError(f"act={text}: percentile must be in (50, 100]")
        return "percentile", p
    raise QpipeError(f"act={text}: expected 'minmax' or 'percentile:P'")


def _output_producers(gm: GraphModule) -> set[Node]:
    """The compute nodes whose values reach the graph output through views or a tail op."""
    out: set[Node] = set()
    output = next(n for n in gm.graph.nodes if n.op == "output")
    stack = list(output.all_input_nodes)
    while stack:
        node = stack.pop()
        if is_call(node, TRANSPARENT | TAIL_OPS):
            stack.extend(node.all_input_nodes[:1])
        else:
            out.add(node)
    return out


@register(
    "insert-observers",
    needs=Stage.FOLDED,
    leaves=Stage.OBSERVED,
    options={"act": "percentile:99.99", "w_bits": 8, "a_bits": 8, "in_bits": 8, "out_bits": 16, "out_act": "minmax"},
)
def insert_observers(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Write the quantization policy into node.meta and insert activation observers.

    Weights: symmetric per output channel (``w_bits``). Activations: symmetric
    per tensor (``a_bits``), range by ``act`` (minmax or percentile:P). The graph
    output (logits) uses ``out_bits`` and ``out_act`` so that clipping cannot tie
    the argmax. A conv or add read only by an activation is observed after the
    activation, so ReLU outputs use all positive levels.
    """
    opts = ctx.options
    missing = unsupported_ops(gm)
    if missing:
        listing = ", ".join(f"{op} x{n}" for op, n in missing.items())
        raise QpipeError(
            f"this model uses ops that have no integer kernel yet: {listing} "
            "(qpipe quantizes convolutional CTC models today; attention, LayerNorm, SiLU/GLU are on the roadmap)"
        )
    method, pct = parse_act_method(str(opts["act"]))
    out_method, out_pct = parse_act_method(str(opts["out_act"]))
    producers = _output_producers(gm)
    targets: list[tuple[Node, dict]] = []
    weights = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder" and isinstance(node.meta.get("val"), torch.Tensor) and node.meta["val"].is_floating_point():
            targets.append((node, {"role": "input", "bits": opts["in_bits"], "method": method, "percentile": pct}))
            continue
        if is_call(node, CONV_OPS | LINEAR_OPS):
            node.meta[QPOLICY] = {"w_bits": int(opts["w_bits"]), "w_scheme": "per-channel"}
            weights += 1
        if is_call(node, CONV_OPS | LINEAR_OPS | ADD_OPS | ACTIVATION_OPS):
            users = users_through(node, TRANSPARENT)
            if not is_call(node, ACTIVATION_OPS) and len(users) == 1 and is_call(users[0], ACTIVATION_OPS) and node not in producers:
                node.meta.setdefault(QPOLICY, {})["out"] = "after-activation"
                continue
            if node in producers:
                policy = {"role": "output", "bits": opts["out_bits"], "method": out_method, "percentile": out_pct}
            else:
                policy = {"role": "activation", "bits": opts["a_bits"], "method": method, "percentile": pct}
            targets.append((node, policy))
    for index, (node, policy) in enumerate(targets):
        name = f"qpipe_obs_{index}"
        gm.add_submodule(name, ActObserver(policy["method"], policy["percentile"], int(policy["bits"])))
        with gm.graph.inserting_after(node):
            obs = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(obs, delete_user_cb=lambda user, obs=obs: user is not obs)
        obs.meta["val"] = node.meta.get("val")
        obs.meta[QPOLICY] = {k: v for k, v in policy.items() if not (k == "percentile" and policy["method"] == "minmax")}
        set_provenance(obs, [node])
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, bool(targets), {"observers": len(targets), "weights": weights})
