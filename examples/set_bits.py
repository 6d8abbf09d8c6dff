"""An example user pass: change the bit width of chosen layers (policy is data).

Run it between insert-observers and the calibration:

    qpipe model.nemo --load examples/set_bits.py \
        --passes "fold-bn,insert-observers,set-bits{match=encoder.0,bits=6},calibrate-synthetic,substitute-int-ops,fuse-requant,eliminate-dead-float"

The policy in ``meta["qpolicy"]`` is a frozen, validated spec: a pass replaces it
(``dataclasses.replace``), and a bit width that makes no sense fails right here.
"""
from dataclasses import replace

from qpipe.ir.meta import QPOLICY, source_name
from qpipe.ir.passes import PassContext, PassResult, register
from qpipe.ir.policy import LayerPolicy, QuantSpec
from qpipe.ir.stages import Stage


@register("set-bits", needs=Stage.OBSERVED, leaves=Stage.OBSERVED, options={"match": "", "bits": 8, "weights": True})
def set_bits(gm, ctx: PassContext) -> PassResult:
    """Set activation (and weight) bits of every layer whose source name contains `match`."""
    match, bits = str(ctx.options["match"]), int(ctx.options["bits"])
    changed = 0
    for node in gm.graph.nodes:
        policy = node.meta.get(QPOLICY)
        if policy is None or match not in source_name(node):
            continue
        if isinstance(policy, QuantSpec) and policy.role == "activation":
            node.meta[QPOLICY] = replace(policy, bits=bits)
            changed += 1
        if ctx.options["weights"] and isinstance(policy, LayerPolicy) and policy.weight is not None:
            node.meta[QPOLICY] = replace(policy, weight=replace(policy.weight, bits=bits))
            changed += 1
    return PassResult(gm, changed > 0, {"changed": changed})
