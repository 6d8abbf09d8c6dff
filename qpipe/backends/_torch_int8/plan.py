"""The integer graph as a *plan*: plain data that ``torch.load(weights_only=True)``
reads back without the pipeline, fx or the graph's Python objects.

A plan is ``{"format", "input", "steps", "tensors", "output"}``. Each step is one
call of the graph in order: ``{"out": name, "fn": "qpipe.conv1d_rq" | "aten.transpose.int"
| "operator.mul", "args": {...} | [...], "dtype": "torch.int8" | None}``. qpipe ops
keep their arguments *by name* (read through the op's ``OpSpec``), so the fast
program picks its kernels from argument names, never positions. An argument is a
Python value, ``{"ref": name}`` (an earlier step's output or the input) or
``{"tensor": key}`` (a constant in ``tensors``); lists nest.

The choice of kernels is not in the plan: it is made when the plan is loaded,
for the machine it is loaded on (C++ compiler or not, VNNI or not, CUDA).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qpipe.ir.errors import QpipeError
from qpipe.ir.opspec import spec_of

FORMAT = "qpipe-torch-int8-plan/1"
_OPERATORS = {f"operator.{n}": getattr(operator, n) for n in ("mul", "add", "sub", "floordiv", "getitem", "neg", "mod")}


def _fn_name(node: Node) -> str:
    t = node.target
    spec = spec_of(node)
    if spec is not None:
        return f"qpipe.{spec.name}"
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._schema.name.split('::', 1)[1]}.{t._overloadname}"
    for name, fn in _OPERATORS.items():
        if t is fn:
            return name
    raise QpipeError(f"torch-int8: cannot run %{node.name} ({t}): not a qpipe op, an aten op or a size computation")


def plan_from_graph(gm: GraphModule) -> dict[str, Any]:
    """The integer graph ``gm`` (the pipeline's, or ``ExportedProgram.module()``) as a plan."""
    tensors: dict[str, torch.Tensor] = {}
    names: dict[Node, str] = {}
    steps: list[dict[str, Any]] = []
    inputs: list[str] = []
    output: Any = None

    def enc(a: Any) -> Any:
        if isinstance(a, Node):
            if a not in names:
                raise QpipeError(f"torch-int8: %{a.name} is used before it is defined")
            return names[a]
        if isinstance(a, (list, tuple)):
            return [enc(x) for x in a]
        if isinstance(a, torch.Tensor):
            key = f"_const{len(tensors)}"
            tensors[key] = a.detach().clone()
            return {"tensor": key}
        if isinstance(a, (torch.dtype, torch.memory_format, torch.layout, torch.device)):
            return {"torch": str(a)}
        if a is None or isinstance(a, (bool, int, float, str)):
            return a
        raise QpipeError(f"torch-int8: cannot store the argument {a!r}")

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            names[node] = {"ref": node.name}
            inputs.append(node.name)
        elif node.op == "get_attr":
            obj = gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            if not isinstance(obj, torch.Tensor):
                raise QpipeError(f"torch-int8: get_attr %{node.name} is not a tensor")
            tensors[node.name] = obj.detach().clone()
            names[node] = {"tensor": node.name}
        elif node.op == "call_module" and str(node.target) == "_guards_fn":
            continue  # torch.export's shape guards (ExportedProgram.module())
        elif node.op == "call_function":
            fn = _fn_name(node)
            spec = spec_of(node)
            if spec is not None:
                args: Any = {k: enc(v) for k, v in spec.bind(node).items()}
            else:
                args = [enc(a) for a in node.args]
                if node.kwargs:
                    args = {"args": args, "kwargs": {k: enc(v) for k, v in node.kwargs.items()}}
            val = node.meta.get("val")
            steps.append({"out": node.name, "fn": fn, "args": args,
                          "dtype": str(val.dtype) if isinstance(val, torch.Tensor) else None})
            names[node] = {"ref": node.name}
        elif node.op == "output":
            output = enc(node.args[0])
        else:
            raise QpipeError(f"torch-int8: cannot run a {node.op} node (%{node.name})")
    if len(inputs) != 1:
        raise QpipeError(f"torch-int8: the integer graph must have one input, it has {len(inputs)}")
    return {"format": FORMAT, "input": inputs[0], "steps": steps, "tensors": tensors, "output": output}


def resolve_fn(name: str):
    """The callable a step's ``fn`` names (aten ops and operators; qpipe ops are the program's)."""
    if name in _OPERATORS:
        return _OPERATORS[name]
    ns, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, ns), op), overload)


def check_plan(plan: Any) -> dict[str, Any]:
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        found = plan.get("format") if isinstance(plan, dict) else type(plan).__name__
        raise QpipeError(f"torch-int8: unknown plan format {found!r} (expected {FORMAT})")
    return plan
