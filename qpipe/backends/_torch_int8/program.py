"""A plan (see :mod:`.plan`) made runnable: one prepared kernel per step.

Kernels are chosen here, for the machine and device the plan is loaded on; every
choice is recorded in ``Program.kernels`` (step -> kernel) so that a benchmark or a
test can say what ran. A qpipe op without a fast kernel runs its own reference
kernel (``OpSpec.op``), so every plan runs, and runs the same integers.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

import qpipe.ir.ops  # noqa: F401  (registers the op specs that reference fallbacks use)
from qpipe.ir.errors import QpipeError
from qpipe.ir.opspec import spec_by_name
from qpipe.backends._torch_int8.plan import check_plan, resolve_fn

_BITS = {"torch.int8": 8, "torch.int16": 16, "torch.int32": 32, "torch.int64": 64, "torch.uint8": 8}


def _decode(a: Any, tensors: dict[str, Tensor], device: torch.device) -> Any:
    """Constants resolved; references left as ("ref", name)."""
    if isinstance(a, dict):
        if "ref" in a:
            return ("ref", a["ref"])
        if "tensor" in a:
            return tensors[a["tensor"]].to(device)
        if "torch" in a:
            return eval(a["torch"], {"torch": torch})  # noqa: S307  (only str(torch.dtype)-like names are written)
        return {k: _decode(v, tensors, device) for k, v in a.items()}
    if isinstance(a, list):
        return [_decode(x, tensors, device) for x in a]
    return a


def _is_ref(a: Any) -> bool:
    return isinstance(a, tuple) and len(a) == 2 and a[0] == "ref"


def _getter(a: Any) -> Callable[[dict], Any]:
    if _is_ref(a):
        name = a[1]
        return lambda env: env[name]
    if isinstance(a, list) and any(_is_ref(x) or isinstance(x, list) for x in a):
        gs = [_getter(x) for x in a]
        return lambda env: [g(env) for g in gs]
    return lambda env: a


class Program:
    """``Program(plan, device)(features) -> integer logits``; ``kernels`` says what runs where."""

    def __init__(self, plan: dict[str, Any], device: str | torch.device = "cpu", use_ext: bool = True,
                 kernels: Optional[str] = None):
        """``kernels``: whose kernels run, ``"cpu"`` or ``"cuda"`` (default: the device's). The CUDA ones on a CPU
        device is how the tests run them without a GPU (Triton's in its interpreter)."""
        plan = check_plan(plan)
        self.device = torch.device(device)
        self.input = plan["input"]
        self.kernels: dict[str, str] = {}
        self.backend = _backend(kernels or self.device.type, self.device, use_ext)
        tensors = plan["tensors"]
        dtypes: dict[str, str] = {}
        self.steps: list[tuple[str, Callable, list[Callable]]] = []
        uses: dict[str, int] = {}
        consumers: dict[str, list] = {}
        producers: dict[str, Any] = {}
        for i, st in enumerate(plan["steps"]):
            args = _decode(st["args"], tensors, self.device)
            fn, getters = self._prepare(st, args, dtypes)
            self.steps.append((st["out"], fn, getters))
            producers[st["out"]] = fn
            dtypes[st["out"]] = st.get("dtype") or ""
            for r in _refs(args):
                uses[r] = i
                consumers.setdefault(r, []).append(fn)
        out = _decode(plan["output"], tensors, self.device)
        self.output = _getter(out)
        keep = set(_refs(out)) | {self.input}
        # a value that only exact-fp32 convolutions read is handed over as fp32 integers
        for name, fn in producers.items():
            users = consumers.get(name, [])
            if getattr(fn, "can_emit_f32", False) and name not in keep and users and all(
                getattr(u, "takes_f32", False) for u in users
            ):
                fn.emit_f32 = True
                self.kernels[name] += " -> f32"
        # drop each value after its last use (peak memory and cache footprint)
        self.free: list[list[str]] = [[] for _ in self.steps]
        for name, last in uses.items():
            if name not in keep:
                self.free[last].append(name)

    def _prepare(self, st: dict[str, Any], args: Any, dtypes: dict[str, str]):
        name = st["fn"]
        if name.startswith("qpipe."):
            op = name.split(".", 1)[1]
            x = args.get("x") if isinstance(args, dict) else None
            x_dtype = dtypes.get(x[1], "torch.int8") if _is_ref(x) else "torch.int8"
            # the input's width and sign (a ReLU's output is uint8 [0, 255]): a kernel's accumulator bound
            made = self.backend.make(op, args, _BITS.get(x_dtype, 8), x_dtype == "torch.uint8")
            if made is not None:
                fn, inputs, kind = made
                self.kernels[st["out"]] = kind
                return fn, [_getter(args[k]) for k in inputs]
            spec = spec_by_name(op)
            self.kernels[st["out"]] = "reference"
            getters = [_getter(args[n]) for n in spec.arg_names]
            return spec.op, getters
        fn = resolve_fn(name)
        if isinstance(args, dict):  # args + kwargs
            ga, gk = [_getter(a) for a in args["args"]], {k: _getter(v) for k, v in args["kwargs"].items()}
            return (lambda *xs, _f=fn, _k=list(gk): _f(*xs[: len(ga)], **dict(zip(_k, xs[len(ga):])))), ga + list(gk.values())
        return fn, [_getter(a) for a in args]

    @torch.no_grad()
    def __call__(self, features: Tensor) -> Any:
        env: dict[str, Any] = {self.input: features.to(self.device)}
        with self.backend.context():
            for (out, fn, getters), free in zip(self.steps, self.free):
                env[out] = fn(*[g(env) for g in getters])
                for name in free:
                    del env[name]
            result = self.output(env)
        return result[0] if isinstance(result, list) and len(result) == 1 else result


def _refs(a: Any):
    if _is_ref(a):
        yield a[1]
    elif isinstance(a, dict):
        for v in a.values():
            yield from _refs(v)
    elif isinstance(a, list):
        for v in a:
            yield from _refs(v)


def _backend(kernels: str, device: torch.device, use_ext: bool):
    if kernels == "cpu" and device.type == "cpu":
        from qpipe.backends._torch_int8.cpu_program import CpuBackend

        return CpuBackend(use_ext)
    if kernels == "cuda":
        from qpipe.backends._torch_int8.cuda import CudaBackend

        return CudaBackend(device)
    raise QpipeError(f"torch-int8: no {kernels} kernels for device '{device}' (cpu or cuda)")
