"""The CUDA program replayed as one CUDA graph per input shape.

Eager, the program is a few hundred small launches per call (QuartzNet 15x5:
about 170 convolutions, each an ``_int_mm`` and a Triton requant), and on a fast
GPU the Python and launch cost of those exceeds the kernels' own time. A CUDA
graph records the launches once for a shape and replays them with one call. The
kernels and their integers are the same, so the output is bit for bit the eager
program's; a shape the graph has not seen is captured on its first call (the
first call of a shape runs eagerly, and its second one captures: a shape seen
once, as most are when utterances of every length come in, costs no capture; ASR
serving that buckets by length sees few shapes, each replayed from then on).

Where capture fails (a kernel that syncs with the host, an old driver) the call
runs eagerly, and ``mode`` says why, so that a benchmark reports what ran.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor


class CudaGraphed:
    """``CudaGraphed(program)(features)``: the program's output, replayed from a captured graph.

    ``program``: any callable of one CUDA tensor whose launches do not sync with the host (a
    :class:`~qpipe.backends._torch_int8.program.Program` on CUDA; a benchmark's float model);
    ``device``: its device (default ``program.device``)."""

    def __init__(self, program: Any, device: Any = None, max_shapes: int = 8, warmup: int = 2, capture_after: int = 1):
        """``capture_after``: eager calls of a shape before it is captured (0: capture on its first call)."""
        self.program = program
        self.device = torch.device(device if device is not None else program.device)
        self.kernels = getattr(program, "kernels", {})
        self.max_shapes, self.warmup, self.capture_after = max_shapes, warmup, capture_after
        self.seen: dict[tuple, int] = {}
        self.graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Any]] = OrderedDict()
        self.failure: str | None = None  # why capture failed, once it has: every call runs eagerly from then on

    @property
    def mode(self) -> str:
        """What runs: ``"cuda graph"``, or ``"eager (CUDA graph capture failed: ...)"`` with the reason."""
        return "cuda graph" if self.failure is None else f"eager (CUDA graph capture failed: {self.failure})"

    def _capture(self, x: Tensor):
        static_in = x.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up off the capture stream: Triton compiles, cuBLASLt picks its algorithms
            for _ in range(self.warmup):
                self.program(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # a pool of its own: no graph's replay can touch another's memory
            static_out = self.program(static_in)
        return graph, static_in, static_out

    @torch.no_grad()
    def __call__(self, features: Tensor) -> Any:
        x = features.to(self.device)
        if self.failure is not None:
            return self.program(x)
        key = (tuple(x.shape), x.dtype)
        entry = self.graphs.get(key)
        if entry is None:
            calls = self.seen.get(key, 0)
            if calls < self.capture_after:
                if len(self.seen) > 1024:  # many one-off shapes: forget them rather than grow
                    self.seen.clear()
                self.seen[key] = calls + 1
                return self.program(x)
            try:
                entry = self._capture(x)
            except Exception as exc:  # noqa: BLE001  (any capture failure: run eagerly and say so)
                self.failure = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
                self.graphs.clear()
                return self.program(x)
            self.graphs[key] = entry
            if len(self.graphs) > self.max_shapes:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        if isinstance(static_out, Tensor):
            return static_out.clone()
        return [o.clone() for o in static_out]
