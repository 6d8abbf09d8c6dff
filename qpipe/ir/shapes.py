"""Re-derive ``meta["val"]`` (fake tensors, symbolic time axis) after a pass.

Passes build nodes without shapes; running the graph in the fake mode that
torch.export used keeps the dynamic dimensions symbolic, so printed IR and
backends see ``i8[1,256,T]`` rather than a concrete example length.
"""
from __future__ import annotations

import torch
import torch._refs
from torch.fx import GraphModule, Interpreter, Node
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode


def _fake_mode(gm: GraphModule) -> FakeTensorMode:
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, FakeTensor):
            return val.fake_mode
    raise ValueError("graph has no fake-tensor metadata to propagate from (was it made by torch.export?)")


def _pad_ref(x, pad, mode="constant", value=None):
    if mode != "constant":
        return torch.ops.aten.pad.default(x, pad, mode, value)
    return torch._refs.constant_pad_nd(x, pad, 0.0 if value is None else value)


# ATen ops whose fake kernel turns symbolic sizes into the example's ints; their Python refs do not.
_SYMBOLIC_REFS = {
    torch.ops.aten.pad.default: _pad_ref,
    torch.ops.aten.constant_pad_nd.default: lambda x, pad, value=0: torch._refs.constant_pad_nd(x, pad, value),
}


class _FakeProp(Interpreter):
    def __init__(self, gm: GraphModule, mode: FakeTensorMode):
        super().__init__(gm, garbage_collect_values=True)
        self.mode = mode

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
            value = self.mode.from_tensor(value, static_shapes=True)
        return value

    def call_function(self, target, args, kwargs):
        if target in _SYMBOLIC_REFS:  # their fake kernels read the sizes as ints: batch and time would specialize
            return _SYMBOLIC_REFS[target](*args, **kwargs)
        return super().call_function(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if getattr(module, "qpipe_identity", False):  # observers pass values through
            return args[0]
        return super().call_module(target, args, kwargs)

    def run_node(self, n: Node):
        result = super().run_node(n)
        if n.op not in ("output",):
            n.meta["val"] = result
        return result


def propagate_meta(gm: GraphModule) -> None:
    """Recompute ``meta["val"]`` for every node of ``gm`` from its placeholders."""
    mode = _fake_mode(gm)
    with mode:
        _FakeProp(gm, mode).run(*[n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"])
