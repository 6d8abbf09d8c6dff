"""``mean_int`` (:mod:`qpipe.ir.ops.mean`): integer-exact.

``ReduceSum`` of the int64 qpipe units over ``dim``, then the reference's one
rounding ``floor((2 sum m + c 2**s) / (2 c 2**s))`` (a floor division by
``Mod``/``Div``, ONNX's integer ``Div`` truncates), clamp, codes. ``c`` is the
``count`` tensor the graph computes (a :class:`~qpipe.backends.onnx.codes.Plain`
int64) or the size of the reduced dimensions (a constant, or ``Shape`` ->
``Gather`` -> ``ReduceProd`` for a symbolic one)."""
from __future__ import annotations

import numpy as np
import torch
from torch.fx import Node

from qpipe.backends.onnx.codes import INTEGER, Plain, codes, floor_div, from_int64, rank, record, static_dim, to_int64
from qpipe.backends.onnx.registry import lowering
from qpipe.ir.errors import QpipeError


def _count(builder, node: Node, args: dict, x, dims: list[int]) -> str:
    count = args["count"]
    if count is None:
        sizes = [static_dim(args["x"], d) for d in dims]
        if all(s is not None for s in sizes):
            return builder.const("count", np.array(int(np.prod(sizes)), np.int64))
        shape = builder.node("Shape", [x.name], f"{node.name}_shape")
        picked = builder.node("Gather", [shape, builder.const("dims", np.array(dims, np.int64))], f"{node.name}_sizes")
        return builder.node("ReduceProd", [picked], f"{node.name}_count", keepdims=0)
    v = builder.value(count)
    if isinstance(v, tuple) and v and v[0] == "attr":
        return builder.const(f"{node.name}_count", builder.tensor(count).to(torch.int64).numpy())
    if isinstance(v, Plain):
        return v.name if v.elem == builder.TP.INT64 else builder.node("Cast", [v.name], f"{node.name}_count", to=builder.TP.INT64)
    raise QpipeError(f"onnx-qdq: the count of %{node.name} is not an integer tensor")


@lowering("mean_int")
def lower_mean_int(builder, node: Node, spec):
    args = spec.bind(node)
    x = codes(builder, node, args["x"], "input")
    nd = rank(args["x"])
    dims = sorted({int(d) % nd for d in args["dim"]}) if args["dim"] else list(range(nd))
    h = node.name
    total = builder.node("ReduceSum", [to_int64(builder, x, h), builder.const("axes", np.array(dims, np.int64))],
                         f"{h}_sum", keepdims=int(bool(args["keepdim"])))
    m = int(builder.tensor(args["m"]).reshape(-1)[0])
    s = int(builder.tensor(args["s"]).reshape(-1)[0])
    c = _count(builder, node, args, x, dims)
    den = builder.node("Mul", [c, builder.const("pow2s", np.array(1 << s, np.int64))], f"{h}_den")
    num = builder.node("Add", [builder.node("Mul", [total, builder.const(f"{h}_2m", np.array(2 * m, np.int64))], f"{h}_2sm"),
                               den], f"{h}_num")
    den2 = builder.node("Mul", [den, builder.const("two", np.array(2, np.int64))], f"{h}_2den")
    q = floor_div(builder, num, den2, h)
    record(builder, "mean_int", INTEGER)
    return from_int64(builder, q, node, int(args["lo"]), int(args["hi"]), int(args["bits"]))
