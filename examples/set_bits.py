"""An example user pass: change the bit width of chosen layers (policy is data).

Run it between insert-observers and the calibration:

    qpipe model.nemo --load examples/set_bits.py \
        --passes "fold-bn,insert-observers,set-bits{match=encoder.0,bits=6},calibrate-synthetic,substitute-int-ops,fuse-requant,eliminate-dead-float"
"""
from qpipe.ir.meta import QPOLICY, source_name
from qpipe.ir.passes import PassContext, PassResult, register
from qpipe.ir.stages import Stage


@register("set-bits", needs=Stage.OBSERVED, leaves=Stage.OBSERVED, options={"match": "", "bits": 8, "weights": True})
def set_bits(gm, ctx: PassContext) -> PassResult:
    """Set activation (and weight) bits of every layer whose source name contains `match`."""
    match, bits = str(ctx.options["match"]), int(ctx.options["bits"])
    changed = 0
    for node in gm.graph.nodes:
        policy = node.meta.get(QPOLICY)
        if not policy or match not in source_name(node):
            continue
        if "bits" in policy and policy.get("role") == "activation":
            policy["bits"] = bits
            changed += 1
        if ctx.options["weights"] and "w_bits" in policy:
            policy["w_bits"] = bits
            changed += 1
    return PassResult(gm, changed > 0, {"changed": changed})
