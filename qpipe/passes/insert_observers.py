"""insert-observers: decide what gets quantized how, and observe the activations."""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from qpipe.ir.errors import QpipeError
from qpipe.ir.graph_utils import users_through
from qpipe.ir.meta import QPOLICY, set_provenance
from qpipe.ir.observer import ActObserver
from qpipe.ir.passes import Opt, PassContext, PassResult, register
from qpipe.ir.policy import LayerPolicy, QuantSpec, parse_range_method
from qpipe.ir.stages import Stage
from qpipe.passes.lower import family_of, transparent_ops, unsupported_ops
from qpipe.passes.lower.table import ops_where


def _output_producers(gm: GraphModule) -> set[Node]:
    """The compute nodes whose values reach the graph output through views or a tail op."""
    looked_through = transparent_ops() | ops_where(lambda f: f.output_only)
    out: set[Node] = set()
    output = next(n for n in gm.graph.nodes if n.op == "output")
    stack = list(output.all_input_nodes)
    while stack:
        node = stack.pop()
        if node.op == "call_function" and node.target in looked_through:
            stack.extend(node.all_input_nodes[:1])
        else:
            out.add(node)
    return out


def _is_activation(node: Node) -> bool:
    family = family_of(node)
    return family is not None and family.activation


def unsupported_message(gm: GraphModule) -> str | None:
    missing = unsupported_ops(gm)
    if not missing:
        return None
    listing = ", ".join(f"{op} x{n}" for op, n in missing.items())
    return (
        f"this model uses ops that have no integer kernel yet: {listing} "
        "(qpipe quantizes convolutional CTC models today; attention, LayerNorm, SiLU/GLU are on the roadmap)"
    )


def _range_method_problem(text: str) -> str | None:
    try:
        parse_range_method(text)
    except QpipeError:
        return "must be minmax or percentile:P with P in (50, 100]"
    return None


_BITS = {"lo": 2, "hi": 16}  # what QuantSpec accepts


@register(
    "insert-observers",
    needs=Stage.FOLDED,
    leaves=Stage.OBSERVED,
    options={
        "act": Opt("percentile:99.99", check=_range_method_problem),
        "w_bits": Opt(8, **_BITS),
        "a_bits": Opt(8, **_BITS),
        "in_bits": Opt(8, **_BITS),
        "out_bits": Opt(16, **_BITS),
        "out_act": Opt("minmax", check=_range_method_problem),
    },
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
    message = unsupported_message(gm)
    if message:
        raise QpipeError(message)
    act = QuantSpec.activation(str(opts["act"]), int(opts["a_bits"]))
    inputs = QuantSpec.activation(str(opts["act"]), int(opts["in_bits"]), role="input")
    outputs = QuantSpec.activation(str(opts["out_act"]), int(opts["out_bits"]), role="output")
    weight = QuantSpec(bits=int(opts["w_bits"]), role="weight", scheme="per-channel")
    producers = _output_producers(gm)
    targets: list[tuple[Node, QuantSpec]] = []
    weights = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder" and isinstance(node.meta.get("val"), torch.Tensor) and node.meta["val"].is_floating_point():
            targets.append((node, inputs))
            continue
        family = family_of(node)
        if family is None or not family.observed:
            continue
        layer = LayerPolicy(weight=weight if family.weight else None)
        weights += family.weight is not None
        users = users_through(node, transparent_ops())
        if not family.activation and len(users) == 1 and _is_activation(users[0]) and node not in producers:
            node.meta[QPOLICY] = LayerPolicy(weight=layer.weight, after_activation=True)
            continue
        if layer.weight is not None:
            node.meta[QPOLICY] = layer
        targets.append((node, outputs if node in producers else act))
    for index, (node, policy) in enumerate(targets):
        name = f"qpipe_obs_{index}"
        gm.add_submodule(name, ActObserver(policy.method, policy.percentile, policy.bits))
        with gm.graph.inserting_after(node):
            obs = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(obs, delete_user_cb=lambda user, obs=obs: user is not obs)
        obs.meta["val"] = node.meta.get("val")
        obs.meta[QPOLICY] = policy
        set_provenance(obs, [node])
    return PassResult(gm, bool(targets), {"observers": len(targets), "weights": weights})
