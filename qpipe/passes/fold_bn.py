"""fold-bn: fold inference BatchNorm into the convolution before it."""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from qpipe.ir.errors import QpipeError
from qpipe.ir.graph_utils import add_constant, delete_unused_attributes, fetch_attr
from qpipe.ir.meta import BN_TARGET, set_provenance, source_name
from qpipe.ir.passes import PassContext, PassResult, register
from qpipe.ir.stages import Stage
from qpipe.ir.verifier import BATCH_NORM_OPS
from qpipe.passes.lower.conv import CONV_OPS, conv_args
from qpipe.passes.lower.table import is_call


def _bn_args(node):
    a = list(node.args)
    if node.target is torch.ops.aten.batch_norm.default:
        x, weight, bias, mean, var, _training, _momentum, eps = a[:8]
    else:  # _native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps)
        x, weight, bias, mean, var, _momentum, eps = a[:7]
    return x, weight, bias, mean, var, float(eps)


@register("fold-bn", needs=Stage.FLOAT, leaves=Stage.FOLDED)
def fold_batchnorm(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Fold inference BatchNorm into the preceding convolution (records BN targets for calibration).

    The folded conv's output would have mean beta and standard deviation
    |gamma| * sqrt(var / (var + eps)) on the data the BN statistics came from;
    those are stored in ``meta["bn_target"]`` for calibrate-synthetic.
    """
    folded = 0
    for bn in [n for n in gm.graph.nodes if is_call(n, BATCH_NORM_OPS)]:
        x, weight, bias, mean, var, eps = _bn_args(bn)
        if not is_call(x, CONV_OPS) or len(x.users) != 1:
            raise QpipeError(f"BatchNorm {source_name(bn)} does not follow a convolution it alone reads; cannot fold")
        conv = x
        _, w_node, b_node, *_ = conv_args(conv)
        w = fetch_attr(gm, w_node.target).detach().to(torch.float64)
        c = w.shape[0]
        gamma = fetch_attr(gm, weight.target).detach().to(torch.float64) if weight is not None else torch.ones(c, dtype=torch.float64)
        beta = fetch_attr(gm, bias.target).detach().to(torch.float64) if bias is not None else torch.zeros(c, dtype=torch.float64)
        mu = fetch_attr(gm, mean.target).detach().to(torch.float64)
        sigma2 = fetch_attr(gm, var.target).detach().to(torch.float64)
        b = fetch_attr(gm, b_node.target).detach().to(torch.float64) if b_node is not None else torch.zeros(c, dtype=torch.float64)
        inv = gamma / torch.sqrt(sigma2 + eps)
        new_w = (w * inv.reshape(-1, *([1] * (w.dim() - 1)))).to(torch.float32)
        new_b = ((b - mu) * inv + beta).to(torch.float32)
        hint = str(w_node.target).rsplit(".", 1)[0] if "." in str(w_node.target) else str(w_node.target)
        w_const = add_constant(gm, f"{hint}_folded_weight", new_w, conv)
        b_const = add_constant(gm, f"{hint}_folded_bias", new_b, conv)
        args = list(conv_args(conv))
        args[1], args[2] = w_const, b_const
        conv.args = tuple(args)
        conv.kwargs = {}
        conv.meta[BN_TARGET] = {
            "mean": beta.to(torch.float32),
            "std": (gamma.abs() * torch.sqrt(sigma2 / (sigma2 + eps))).to(torch.float32),
        }
        set_provenance(conv, [conv, bn])
        bn.replace_all_uses_with(conv)
        gm.graph.erase_node(bn)
        folded += 1
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    removed, _ = delete_unused_attributes(gm)
    return PassResult(gm, folded > 0, {"folded": folded, "params_removed": removed})
