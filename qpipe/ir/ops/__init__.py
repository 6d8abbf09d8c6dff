"""The ``qpipe::`` integer op set: one module per op family, each op with its
:class:`~qpipe.ir.opspec.OpSpec`, its exact integer CPU reference kernel and its
fake kernel (shapes and dtypes only, for ``torch.export`` and meta propagation).

The reference kernels are the definition of the numbers: backends must reproduce
them bit for bit. Importing this package registers every op with torch.library.
"""
from qpipe.ir.ops import conv, linear, quantize, requant  # noqa: F401  (each registers its ops)
from qpipe.ir.ops import gelu, iexp, mean, mul, sigmoid, softmax  # noqa: F401  (the nonlinear kernels)
from qpipe.ir.ops import elementwise, layernorm, matmul  # noqa: F401  (the Conformer's integer ops)
from qpipe.ir.ops.kernels import dtype_for_bits, requant_reference, round_shift

__all__ = ["dtype_for_bits", "requant_reference", "round_shift"]
