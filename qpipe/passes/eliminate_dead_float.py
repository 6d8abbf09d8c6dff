"""eliminate-dead-float: drop what the integer graph no longer reads; fail on float left inside."""
from __future__ import annotations

from torch.fx import GraphModule

from qpipe.ir.errors import QpipeError
from qpipe.ir.graph_utils import delete_unused_attributes, prune_to_outputs
from qpipe.ir.passes import PassContext, PassResult, register
from qpipe.ir.stages import Stage
from qpipe.ir.verifier import integer_region, integer_violations


@register("eliminate-dead-float", needs=Stage.INTEGER, leaves=Stage.INTEGER)
def eliminate_dead_float(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Remove dead float nodes and weights; fail, naming each node, if a float op remains in the integer region."""
    removed_nodes = prune_to_outputs(gm)
    removed_attrs, freed = delete_unused_attributes(gm)
    problems = integer_violations(gm)
    if problems:
        raise QpipeError(
            f"{len(problems)} float op(s) remain between the input quantizer and the output:\n  " + "\n  ".join(problems)
        )
    region = integer_region(gm)
    return PassResult(
        gm,
        bool(removed_nodes or removed_attrs),
        {
            "removed_nodes": removed_nodes,
            "removed_params": removed_attrs,
            "freed_mb": round(freed / 2**20, 2),
            "integer_nodes": len(region),
            "float_ops": 0,
        },
    )
