"""insert-observers: decide what gets quantized how, and observe the activations."""
from __future__ import annotations

import dataclasses
import difflib

import torch
from torch.fx import GraphModule, Node

from qpipe.ir.errors import QpipeError
from qpipe.ir.graph_utils import users_through
from qpipe.ir.meta import QPOLICY, set_provenance
from qpipe.ir.observer import ActObserver
from qpipe.ir.passes import Opt, PassContext, PassResult, register
from qpipe.ir.policy import LayerPolicy, QuantSpec, parse_range_method
from qpipe.ir.stages import Stage
from qpipe.passes.lower import families, family_of, transparent_ops, unsupported_ops
from qpipe.passes.lower.constants import fold_constant_linears
from qpipe.passes.lower.scale import fold_scalar_products
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
        "(an op needs an op family in qpipe/passes/lower/ and its qpipe:: kernels)"
    )


def _range_method_problem(text: str) -> str | None:
    try:
        parse_range_method(text)
    except QpipeError:
        return "must be minmax or percentile:P with P in (50, 100]"
    return None


_BITS = {"lo": 2, "hi": 16}  # what QuantSpec accepts
KEEP16_SEPARATOR = "+"  # keep16=softmax+layer_norm (a comma would end the option)


def parse_keep16(text: str) -> frozenset[str]:
    """``softmax+layer_norm`` -> the op family names whose outputs stay at 16 bits (checked against the table)."""
    names = [t.strip() for t in str(text).split(KEEP16_SEPARATOR) if t.strip()]
    known = sorted(f.name for f in families())
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise QpipeError(f"keep16={text}: no op family '{name}'{hint}; families: {', '.join(known)}")
    return frozenset(names)


def _keep16_problem(text: str) -> str | None:
    parse_keep16(text)  # raises a QpipeError worded in full
    return None


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
        "keep16": Opt("", check=_keep16_problem),
        "unsigned_relu": Opt(True),
    },
)
def insert_observers(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Write the quantization policy into node.meta and insert activation observers.

    Weights: symmetric per output channel (``w_bits``). Activations: symmetric
    per tensor (``a_bits``), range by ``act`` (minmax or percentile:P). The graph
    output (logits) uses ``out_bits`` and ``out_act`` so that clipping cannot tie
    the argmax. A conv or add read only by an activation is observed after the
    activation, so ReLU outputs use all positive levels.

    ``unsigned_relu`` (default true): an 8-bit tensor that an activation keeps
    non-negative (a ReLU's output) is unsigned, codes ``[0, 255]`` at
    ``amax / 255``: twice the resolution, and the grid of a uint8 QuantizeLinear
    with zero point 0, so ONNX Runtime's fused kernels saturate exactly where
    the reference clamps. ``false``: the signed grid (``[0, 127]`` at ``amax / 127``),
    which TensorRT (no uint8) needs. Other activations use the full signed range
    ``[-128, 127]`` either way.

    ``keep16``: op families (``+``-separated, e.g. ``keep16=softmax+layer_norm``)
    whose outputs stay at 16 bits: an observed family's observer gets 16 bits,
    a fixed-scale one (softmax, sigmoid) gets a 16-bit ``QuantSpec`` its handler
    reads. Empty (the default): integer-only 8-bit activations.

    First, constants are folded where that costs no rounding: ``x * c`` and
    ``x / c`` into the weights of the linear/conv making ``x`` (the Conformer's
    xscaling and 0.5 feed-forward factor), and a linear of a constant (the
    positional encodings' ``linear_pos``) into one constant.
    """
    opts = ctx.options
    message = unsupported_message(gm)
    if message:
        raise QpipeError(message)
    keep16 = parse_keep16(str(opts["keep16"]))
    scalars_folded = fold_scalar_products(gm)
    constants_folded = fold_constant_linears(gm)
    act = QuantSpec.activation(str(opts["act"]), int(opts["a_bits"]))
    inputs = QuantSpec.activation(str(opts["act"]), int(opts["in_bits"]), role="input")
    outputs = QuantSpec.activation(str(opts["out_act"]), int(opts["out_bits"]), role="output")
    weight = QuantSpec(bits=int(opts["w_bits"]), role="weight", scheme="per-channel")
    unsigned = dataclasses.replace(act, unsigned=True) if bool(opts["unsigned_relu"]) and act.bits <= 8 else act
    producers = _output_producers(gm)
    targets: list[tuple[Node, QuantSpec]] = []
    weights = kept16 = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder" and isinstance(node.meta.get("val"), torch.Tensor) and node.meta["val"].is_floating_point():
            targets.append((node, inputs))
            continue
        family = family_of(node)
        if family is not None and family.name in keep16 and not family.observed:
            node.meta[QPOLICY] = QuantSpec(bits=16)
            kept16 += 1
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
        if node in producers:
            targets.append((node, outputs))
        elif family.name in keep16:
            targets.append((node, dataclasses.replace(act, bits=16)))
            kept16 += 1
        elif family.activation and family.bounds is not None and family.bounds(node)[0] >= 0:
            targets.append((node, unsigned))
        else:
            targets.append((node, act))
    for index, (node, policy) in enumerate(targets):
        name = f"qpipe_obs_{index}"
        gm.add_submodule(name, ActObserver(policy.method, policy.percentile, policy.bits, policy.unsigned))
        with gm.graph.inserting_after(node):
            obs = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(obs, delete_user_cb=lambda user, obs=obs: user is not obs)
        obs.meta["val"] = node.meta.get("val")
        obs.meta[QPOLICY] = policy
        set_provenance(obs, [node])
    stats = {"observers": len(targets), "weights": weights, "scalars_folded": scalars_folded,
             "constants_folded": constants_folded, "kept16": kept16}
    return PassResult(gm, bool(targets) or bool(scalars_folded or constants_folded), stats)
