"""The state one ``substitute-int-ops`` run shares with the op handlers.

A handler reads its float node, asks for the integer value of each input
(``int_input``), emits ``qpipe::`` ops by argument name (``emit``) and says which
integer node now stands for the float one (``bind``). Every emitted tensor gets
its ``meta["qtype"]`` here, so no handler can forget it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import numpy as np
import torch
from torch.fx import GraphModule, Node

from qpipe.ir.dyadic import FLOAT64_EXACT, M_BITS, act_range, dyadic_bounded
from qpipe.ir.errors import QpipeError
from qpipe.ir.graph_utils import add_constant, users_through
from qpipe.ir.meta import QPARAMS, QPOLICY, set_provenance, source_name
from qpipe.ir.observer import ActObserver
from qpipe.ir.ops.kernels import f32_multiplier, unsigned_codes
from qpipe.ir.opspec import spec_for
from qpipe.ir.printer import target_name
from qpipe.ir.qtype import QType, qtype_of, set_qtype
from qpipe.passes.lower.constants import quantize_constant_chain
from qpipe.passes.lower.table import family_of, transparent_ops


def observer_of(gm: GraphModule, node: Node) -> Optional[Node]:
    for user in node.users:
        if user.op == "call_module" and isinstance(gm.get_submodule(user.target), ActObserver):
            return user
    return None


def calibration_facts(observer: Node) -> dict:
    """What calibration measured at an observer (kept on the integer node for inspection once observers go)."""
    facts = observer.meta[QPARAMS]
    return {k: facts[k] for k in ("saturation", "amax") if k in facts}


def after_activation(node: Node) -> bool:
    policy = node.meta.get(QPOLICY)
    return bool(getattr(policy, "after_activation", False))


class Lowering:
    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.graph = gm.graph
        self.int_of: dict[Node, Node] = {}
        self.stats: dict[str, int] = {}
        self.tail_ops: list[str] = []
        self.requant_rounding = "f32"  # substitute-int-ops{requant=...}: how 8-bit conv/linear outputs round

    # -- bookkeeping ----------------------------------------------------------
    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def bind(self, node: Node, integer: Node) -> None:
        """``integer`` now stands for the float ``node``."""
        self.int_of[node] = integer

    def qtype(self, node: Node) -> QType:
        q = qtype_of(node)
        if q is None:
            raise QpipeError(f"%{node.name} has no qtype (a handler emitted it without one)")
        return q

    def int_input(self, node: Node, arg: Any) -> Node:
        if isinstance(arg, Node) and arg not in self.int_of:
            quantize_constant_chain(self, node, arg)  # a float constant (through views): quantized once
        if not isinstance(arg, Node) or arg not in self.int_of:
            raise QpipeError(f"%{node.name} = {target_name(node)} ({source_name(node)}): input {arg} is not quantized")
        return self.int_of[arg]

    @staticmethod
    def anchor(node: Node) -> Node:
        """New nodes go right after ``node`` (after its observer), where their inputs exist."""
        return node.next

    # -- making nodes ---------------------------------------------------------
    def const(self, hint: str, value: torch.Tensor, before: Node, qtype: Optional[QType] = None) -> Node:
        node = add_constant(self.gm, hint, value, before)
        if qtype is not None:
            set_qtype(node, qtype)
        return node

    def emit(self, before: Node, op, values: dict[str, Any], src: Node, qtype: QType,
             qparams: Optional[dict] = None) -> Node:
        """A ``qpipe::`` op with its arguments given by name (its spec orders them)."""
        spec = spec_for(op)
        with self.graph.inserting_before(before):
            node = self.graph.create_node("call_function", op, spec.args_from(values), name=f"{src.name}_{spec.name}")
        set_provenance(node, [src])
        lo, hi = values.get("lo"), values.get("hi")
        if isinstance(lo, int) and isinstance(hi, int) and unsigned_codes(qtype.bits, lo, hi) and not qtype.unsigned:
            qtype = dataclasses.replace(qtype, unsigned=True)  # stored as uint8 (ops/kernels.py: dtype_for_range)
        set_qtype(node, qtype)
        if qparams:
            node.meta[QPARAMS] = qparams
        return node

    def copy_layout(self, node: Node, integer_input: Node) -> Node:
        """The same view/select op on the integer tensor: its qtype is its input's."""
        args = (integer_input,) + tuple(node.args[1:])
        with self.graph.inserting_before(self.anchor(node)):
            out = self.graph.create_node("call_function", node.target, args, dict(node.kwargs), name=f"{node.name}_int")
        set_provenance(out, [node])
        set_qtype(out, self.qtype(integer_input))
        return out

    # -- output scales ----------------------------------------------------------
    def out_observer(self, node: Node) -> tuple[Node, Optional[Node]]:
        """The observer whose scale ``node``'s integer output takes, and the activation folded in (if any)."""
        act = None
        if after_activation(node):
            act = users_through(node, transparent_ops())[0]
            obs = observer_of(self.gm, act)
        else:
            obs = observer_of(self.gm, node)
        if obs is None or "scale" not in obs.meta.get(QPARAMS, {}):
            raise QpipeError(f"{source_name(node)} has no calibrated observer: run insert-observers and a calibrate pass first")
        return obs, act

    def out_qparams(self, node: Node) -> tuple[float, int, Optional[Node], dict]:
        """(scale, bits, folded activation or None, calibration facts) of ``node``'s integer output;
        the facts say ``unsigned`` where the observer's policy puts the codes on ``[0, 2**bits - 1]``."""
        obs, act = self.out_observer(node)
        facts = calibration_facts(obs)
        if getattr(obs.meta[QPOLICY], "unsigned", False):
            facts["unsigned"] = True
        return obs.meta[QPARAMS]["scale"], int(obs.meta[QPOLICY].bits), act, facts

    def int_bounds(self, bits: int, scale: float, activation: Optional[Node], unsigned: bool = False) -> tuple[int, int]:
        """The integer clamp for ``bits`` at ``scale`` (the full signed range, or ``[0, 2**bits - 1]``
        when ``unsigned``), narrowed by an activation's real bounds."""
        lo, hi = act_range(bits, unsigned)
        if activation is not None:
            a_lo, a_hi = family_of(activation).bounds(activation)
            if math.isfinite(a_lo):
                lo = max(lo, math.ceil(a_lo / scale - 0.5))
            if math.isfinite(a_hi):
                hi = min(hi, math.floor(a_hi / scale + 0.5))
        return lo, hi

    def acc_bounds(self, acc: Node, channels: int, bounds=None) -> list[int]:
        """Per channel, a proven bound on ``|acc|``: ``bounds`` (one or per channel) or the ``acc_bound`` its lowering recorded."""
        if bounds is None:
            recorded = (acc.meta.get(QPARAMS) or {}).get("acc_bound")
            if recorded is None:  # no proof recorded: the accumulator's own width (32 bits at most here)
                acc_bits = self.qtype(acc).bits
                if acc_bits > 32:
                    raise QpipeError(f"%{acc.name}: a {acc_bits}-bit accumulator without a recorded bound")
                recorded = 1 << (acc_bits - 1)
            bounds = recorded
        if isinstance(bounds, (int, float)):
            return [int(bounds)] * channels
        bounds = [int(b) for b in bounds]
        if len(bounds) == 1:
            return bounds * channels
        if len(bounds) != channels:
            raise QpipeError(f"%{acc.name}: {len(bounds)} accumulator bounds for {channels} channels")
        return bounds

    def requant_after(self, node: Node, acc: Node, before: Node, channel_dim: int, bounds=None,
                      factors: Optional[tuple[float, list[float]]] = None) -> Node:
        """Requantize the accumulator ``acc`` (per-channel scale) to ``node``'s observed output scale.

        Each channel's ``(m, s)`` is the 31-bit dyadic pair of its scale ratio, with ``m``
        shortened only where that channel's proven ``|acc|`` bound (``bounds``, else the
        recorded ``acc_bound``) times ``m`` would pass int64 (16-bit weights and activations).
        The graph's output (the logits) keeps ``|acc| * m + 2**(s-1)`` below 2**53 as well, so
        that its requantization is exact in float64: a backend runs it as one multiply-add-floor
        (ONNX Runtime: 0.08 ms against 0.43 ms for the int64 shifts on the demo QuartzNet's
        head). Only where that costs at most two bits of a 31-bit ``m`` (8-bit inputs): a
        16-bit x 16-bit head keeps its int64 pair.

        ``factors``: ``(S_x, [S_w per channel])`` of a conv / linear. With them, an 8-bit output
        and ``requant_rounding == "f32"``, the pair is the float32 multiplier
        ``fl32(fl32(S_x*S_w)/S_y)`` (in ONNX Runtime's order of operations) and the op rounds as
        float32 arithmetic (``f32=True``).
        """
        out_scale, bits, act, facts = self.out_qparams(node)
        lo, hi = self.int_bounds(bits, out_scale, act, facts.get("unsigned", False))  # straight to the activation's scale and clamp
        f32 = factors is not None and bits <= 8 and self.requant_rounding == "f32"
        try:
            pairs = self._f32_pairs(out_scale, factors) if f32 else self._dyadic_pairs(node, acc, out_scale, bounds)
        except ValueError as exc:
            raise QpipeError(f"{source_name(node)}: {exc}") from exc
        m = self.const(f"{node.name}_m", torch.tensor([p[0] for p in pairs], dtype=torch.int64), before)
        s = self.const(f"{node.name}_s", torch.tensor([p[1] for p in pairs], dtype=torch.int64), before)
        qp = {"out_scale": out_scale, "bits": bits, "lo": lo, "hi": hi, **({"requant": "f32"} if f32 else {}),
              "m": [p[0] for p in pairs], "s": [p[1] for p in pairs], **facts}
        values = {"acc": acc, "m": m, "s": s, "channel_dim": channel_dim, "lo": lo, "hi": hi, "bits": bits,
                  **({"f32": True} if f32 else {})}
        rq = self.emit(before, torch.ops.qpipe.requant.default, values, node, QType.of(bits, out_scale), qp)
        self.bind(node, rq)
        if act is not None:
            self.bind(act, rq)
            self.count("activation")
        return rq

    def _dyadic_pairs(self, node: Node, acc: Node, out_scale: float, bounds) -> list[tuple[int, int]]:
        """31-bit pairs, shortened where int64 (or, for the logits, float64 exactness) needs it."""
        role = getattr(self.out_observer(node)[0].meta[QPOLICY], "role", "activation")
        in_scales = torch.tensor(self.qtype(acc).scales, dtype=torch.float64)
        ratios = (in_scales / out_scale).tolist()
        limits = self.acc_bounds(acc, len(ratios), bounds)
        pairs = [dyadic_bounded(r, b) for r, b in zip(ratios, limits)]
        if role == "output":
            exact = [dyadic_bounded(r, b, limit=FLOAT64_EXACT) for r, b in zip(ratios, limits)]
            if all(m >= 1 << (M_BITS - 3) or m == p for (m, _), (p, _) in zip(exact, pairs)):
                pairs = exact
        return pairs

    @staticmethod
    def _f32_pairs(out_scale: float, factors: tuple[float, list[float]]) -> list[tuple[int, int]]:
        """Per channel, exactly the float32 ``fl32(fl32(S_x*S_w)/S_y)`` (ONNX Runtime's order of operations)."""
        sx, sy = np.float32(factors[0]), np.float32(out_scale)
        return [f32_multiplier(float(np.float32(sx * np.float32(sw)) / sy)) for sw in factors[1]]
