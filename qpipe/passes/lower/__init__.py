"""One handler module per ATen op family: how it is observed and how it becomes
``qpipe::`` integer ops (see :mod:`qpipe.passes.lower.table`). Importing this
package fills the table."""
from qpipe.passes.lower import activation, add, conv, layout, linear  # noqa: F401  (each registers its family)
from qpipe.passes.lower import gates, gelu, mean, softmax  # noqa: F401  (nonlinear families)
from qpipe.passes.lower import layernorm, mask, matmul, scale, shape  # noqa: F401  (the Conformer's families)
from qpipe.passes.lower.context import Lowering
from qpipe.passes.lower.table import OpFamily, families, family_of, is_call, transparent_ops, unsupported_ops

__all__ = ["Lowering", "OpFamily", "families", "family_of", "is_call", "transparent_ops", "unsupported_ops"]
