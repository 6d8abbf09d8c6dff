"""substitute-int-ops: replace float compute with qpipe:: integer ops at the observed scales."""
from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from qpipe.ir.dyadic import dyadic, dyadic_common_shift, int_range
from qpipe.ir.errors import QpipeError
from qpipe.ir.graph_utils import add_constant, fetch_attr, users_through
from qpipe.ir.meta import QPARAMS, QPOLICY, set_provenance, source_name
from qpipe.ir.observer import ActObserver
from qpipe.ir.passes import PassContext, PassResult, register
from qpipe.ir.printer import target_name
from qpipe.ir.shapes import propagate_meta
from qpipe.ir.stages import Stage
from qpipe.passes.ops_table import (
    ACTIVATION_OPS,
    ADD_OPS,
    CONV_OPS,
    DROPOUT_OPS,
    LINEAR_OPS,
    TAIL_OPS,
    TRANSPARENT,
    activation_bounds,
    conv_args,
    is_call,
)
from qpipe.ir.verifier import LAYOUT_OPS

q = torch.ops.qpipe


def _observer_of(gm: GraphModule, node: Node) -> Node | None:
    for user in node.users:
        if user.op == "call_module" and isinstance(gm.get_submodule(user.target), ActObserver):
            return user
    return None


def _out_observer(gm: GraphModule, node: Node) -> tuple[Node, Node | None]:
    """The observer whose scale ``node``'s integer output takes, and the activation folded in (if any)."""
    act = None
    if node.meta.get(QPOLICY, {}).get("out") == "after-activation":
        act = users_through(node, TRANSPARENT)[0]
        obs = _observer_of(gm, act)
    else:
        obs = _observer_of(gm, node)
    if obs is None or "scale" not in obs.meta.get(QPARAMS, {}):
        raise QpipeError(f"{source_name(node)} has no calibrated observer: run insert-observers and a calibrate pass first")
    return obs, act


def _out_qparams(gm: GraphModule, node: Node) -> tuple[float, int, Node | None]:
    """(scale, bits, activation-node-or-None) that ``node``'s integer output must have."""
    obs, act = _out_observer(gm, node)
    return obs.meta[QPARAMS]["scale"], int(obs.meta[QPOLICY]["bits"]), act


def _calibration_facts(gm: GraphModule, node: Node) -> dict:
    """What calibration measured at this output (kept for inspection after observers go)."""
    obs, _ = _out_observer(gm, node)
    facts = obs.meta[QPARAMS]
    return {k: facts[k] for k in ("saturation", "amax") if k in facts}


def _int_bounds(bits: int, scale: float, activation: Node | None) -> tuple[int, int]:
    """The integer clamp for an output of ``bits`` at ``scale``, narrowed by an activation's real bounds."""
    lo, hi = int_range(bits)
    if activation is not None:
        a_lo, a_hi = activation_bounds(activation)
        if math.isfinite(a_lo):
            lo = max(lo, math.ceil(a_lo / scale - 0.5))
        if math.isfinite(a_hi):
            hi = min(hi, math.floor(a_hi / scale + 0.5))
    return lo, hi


def _quantize_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel weights: (int tensor, float64 scale per channel)."""
    _, hi = int_range(bits)
    w64 = w.detach().to(torch.float64)
    amax = w64.abs().reshape(w64.shape[0], -1).amax(dim=1)
    scale = torch.where(amax > 0, amax / hi, torch.ones_like(amax))
    wq = torch.floor(w64 / scale.reshape(-1, *([1] * (w64.dim() - 1))) + 0.5).clamp(-hi, hi)
    return wq.to(torch.int8 if bits <= 8 else torch.int16), scale


class _Substitution:
    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.graph = gm.graph
        self.int_of: dict[Node, Node] = {}
        self.scale_of: dict[Node, float] = {}
        self.bits_of: dict[Node, int] = {}
        self.stats = {"quantize": 0, "conv": 0, "linear": 0, "add": 0, "activation": 0, "layout": 0}
        self.tail_ops: list[str] = []

    def const(self, hint: str, value: torch.Tensor, before: Node) -> Node:
        return add_constant(self.gm, hint, value, before)

    def emit(self, before: Node, target, args: tuple, src: Node, qparams: dict | None = None) -> Node:
        op = target._schema.name.split("::")[-1] if hasattr(target, "_schema") else "q"
        with self.graph.inserting_before(before):
            node = self.graph.create_node("call_function", target, args, name=f"{src.name}_{op}")
        set_provenance(node, [src])
        if qparams:
            node.meta[QPARAMS] = qparams
        return node

    def int_input(self, node: Node, arg) -> Node:
        if not isinstance(arg, Node) or arg not in self.int_of:
            raise QpipeError(
                f"%{node.name} = {target_name(node)} ({source_name(node)}): input {arg} is not quantized"
            )
        return self.int_of[arg]

    def anchor(self, node: Node) -> Node:
        """Insert new nodes after the observer (or node) so their inputs already exist."""
        return node.next

    # -- per op ---------------------------------------------------------------
    def placeholder(self, node: Node) -> None:
        obs = _observer_of(self.gm, node)
        if obs is None:
            return
        scale = obs.meta[QPARAMS]["scale"]
        bits = int(obs.meta[QPOLICY]["bits"])
        facts = {k: obs.meta[QPARAMS][k] for k in ("saturation", "amax") if k in obs.meta[QPARAMS]}
        qn = self.emit(obs.next, q.quantize.default, (node, float(scale), bits), node, {"scale": scale, "bits": bits, **facts})
        self.int_of[node] = qn
        self.int_of[obs] = qn
        self.scale_of[qn], self.bits_of[qn] = scale, bits
        self.stats["quantize"] += 1

    def requant_after(self, node: Node, acc: Node, in_scales: torch.Tensor, before: Node, channel_dim: int, extra: dict) -> Node:
        out_scale, bits, act = _out_qparams(self.gm, node)
        lo, hi = _int_bounds(bits, out_scale, act)  # straight to the activation's scale and clamp
        ratios = (in_scales / out_scale).tolist()
        pairs = [dyadic(r) for r in ratios]
        m = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
        s = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
        m_node = self.const(f"{node.name}_m", m, before)
        s_node = self.const(f"{node.name}_s", s, before)
        qp = {"out_scale": out_scale, "bits": bits, "lo": lo, "hi": hi, "m": m.tolist(), "s": s.tolist(), **_calibration_facts(self.gm, node)}
        rq = self.emit(before, q.requant.default, (acc, m_node, s_node, channel_dim, lo, hi, bits), node, qp)
        self.int_of[node] = rq
        if act is not None:
            self.int_of[act] = rq
            self.stats["activation"] += 1
        self.scale_of[rq], self.bits_of[rq] = out_scale, bits
        return rq

    def conv_or_linear(self, node: Node) -> None:
        is_conv = is_call(node, CONV_OPS)
        if is_conv:
            x, w_node, b_node, stride, padding, dilation, groups = conv_args(node)
        else:
            x, w_node = node.args[0], node.args[1]
            b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        xi = self.int_input(node, x)
        s_x = self.scale_of[xi]
        policy = node.meta.get(QPOLICY, {})
        w_bits = int(policy.get("w_bits", 8))
        w = fetch_attr(self.gm, w_node.target)
        wq, s_w = _quantize_weight(w, w_bits)
        before = self.anchor(node)
        wq_node = self.const(f"{node.name}_wq", wq, before)
        bias_q = None
        bias_bound = 0
        if b_node is not None:
            b = fetch_attr(self.gm, b_node.target).detach().to(torch.float64)
            bq = torch.floor(b / (s_x * s_w) + 0.5)
            bias_bound = int(bq.abs().max()) if bq.numel() else 0
            bias_q = self.const(f"{node.name}_bq", bq.to(torch.int32 if bias_bound < 2**31 else torch.int64), before)
        reduction = int(w.shape[1] * (w.shape[2] if w.dim() > 2 else 1))
        x_hi = int_range(self.bits_of[xi])[1]
        w_hi = int_range(w_bits)[1]
        bound = x_hi * w_hi * reduction + bias_bound
        acc_bits = 32 if bound < 2**31 else 64
        acc_q = {"in_scale": s_x, "w_scale": s_w.to(torch.float32), "acc_bound": bound, "acc_bits": acc_bits}
        if is_conv:
            acc = self.emit(before, q.conv1d_acc.default, (xi, wq_node, bias_q, stride, padding, dilation, groups, acc_bits), node, acc_q)
            self.stats["conv"] += 1
            channel_dim = 1
        else:
            acc = self.emit(before, q.linear_acc.default, (xi, wq_node, bias_q, acc_bits), node, acc_q)
            self.stats["linear"] += 1
            channel_dim = -1
        if channel_dim < 0:
            channel_dim = node.meta["val"].dim() - 1
        self.requant_after(node, acc, s_x * s_w, before, channel_dim, acc_q)

    def add(self, node: Node) -> None:
        a, b = node.args[0], node.args[1]
        if node.kwargs.get("alpha", 1) != 1:
            raise QpipeError(f"{source_name(node)}: add with alpha is not supported")
        ai, bi = self.int_input(node, a), self.int_input(node, b)
        out_scale, bits, act = _out_qparams(self.gm, node)
        lo, hi = _int_bounds(bits, out_scale, act)
        (ma, mb), s = dyadic_common_shift([self.scale_of[ai] / out_scale, self.scale_of[bi] / out_scale])
        qp = {"out_scale": out_scale, "bits": bits, "lo": lo, "hi": hi, "ma": ma, "mb": mb, "s": s, **_calibration_facts(self.gm, node)}
        out = self.emit(self.anchor(node), q.add_requant.default, (ai, bi, ma, mb, s, lo, hi, bits), node, qp)
        self.int_of[node] = out
        if act is not None:
            self.int_of[act] = out
            self.stats["activation"] += 1
        self.scale_of[out], self.bits_of[out] = out_scale, bits
        self.stats["add"] += 1

    def activation(self, node: Node) -> None:
        if node in self.int_of:  # already folded into its producer's requantization
            return
        xi = self.int_input(node, node.args[0])
        scale, bits = self.scale_of[xi], self.bits_of[xi]
        lo, hi = _int_bounds(bits, scale, node)
        out = self.emit(self.anchor(node), q.clamp_int.default, (xi, lo, hi), node, {"lo": lo, "hi": hi})
        self.int_of[node] = out
        self.scale_of[out], self.bits_of[out] = scale, bits
        self.stats["activation"] += 1

    def passthrough(self, node: Node) -> None:
        xi = self.int_input(node, node.args[0])
        self.int_of[node] = xi

    def layout(self, node: Node) -> None:
        src = node.args[0]
        xi = self.int_input(node, src)
        args = (xi,) + tuple(node.args[1:])
        with self.graph.inserting_before(self.anchor(node)):
            out = self.graph.create_node("call_function", node.target, args, dict(node.kwargs), name=f"{node.name}_int")
        set_provenance(out, [node])
        self.int_of[node] = out
        self.scale_of[out], self.bits_of[out] = self.scale_of[xi], self.bits_of[xi]
        self.stats["layout"] += 1

    def tail(self, node: Node) -> None:
        users = users_through(node, TRANSPARENT)
        if any(u.op != "output" for u in users):
            raise QpipeError(f"{source_name(node)}: {target_name(node)} is supported only at the graph output")
        self.tail_ops.append(f"{target_name(node)}(dim={node.args[1] if len(node.args) > 1 else -1})")
        self.passthrough(node)


@register("substitute-int-ops", needs=Stage.CALIBRATED, leaves=Stage.INTEGER)
def substitute_int_ops(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Replace conv, pointwise conv, linear, residual add and ReLU/clamp with qpipe:: integer ops.

    Weights become int8 per output channel, biases int32 at S_x*S_w, each
    accumulator is requantized to its observed output scale by a dyadic (m, s)
    pair; a ReLU read by one producer is folded into that requantization's clamp.
    Old float nodes are left dead for eliminate-dead-float.
    """
    sub = _Substitution(gm)
    unsupported = []
    for node in list(gm.graph.nodes):
        if node.op == "placeholder":
            sub.placeholder(node)
        elif node.op in ("get_attr", "output"):
            continue
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), ActObserver):
            src = node.args[0]
            if src in sub.int_of:
                sub.int_of[node] = sub.int_of[src]
        elif not any(isinstance(a, Node) and a in sub.int_of for a in node.all_input_nodes):
            continue  # not fed by the quantized region (e.g. shape arithmetic)
        elif is_call(node, CONV_OPS | LINEAR_OPS):
            sub.conv_or_linear(node)
        elif is_call(node, ADD_OPS):
            sub.add(node)
        elif is_call(node, ACTIVATION_OPS):
            sub.activation(node)
        elif is_call(node, DROPOUT_OPS):
            sub.passthrough(node)
        elif is_call(node, LAYOUT_OPS):
            sub.layout(node)
        elif is_call(node, TAIL_OPS):
            sub.tail(node)
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
            if arg not in sub.int_of:
                raise QpipeError(f"graph output %{arg.name} ({source_name(arg)}) is not quantized")
            new = sub.int_of[arg]
            outputs_meta.append({"scale": sub.scale_of[new], "bits": sub.bits_of[new]})
            return new
        if isinstance(arg, (list, tuple)):
            return type(arg)(remap(a) for a in arg)
        return arg

    output.args = tuple(remap(a) for a in output.args)
    for node, _ in [(n, None) for n in gm.graph.nodes if n.op == "call_module"]:
        if isinstance(gm.get_submodule(node.target), ActObserver):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.meta["qpipe_outputs"] = outputs_meta
    gm.meta["qpipe_float_tail"] = sub.tail_ops
    gm.graph.lint()
    gm.recompile()
    propagate_meta(gm)
    return PassResult(gm, True, sub.stats)
