"""The graph contract: stages, the ``qpipe::`` integer op set, node metadata,
the printer, the verifier and the pass infrastructure.

Importing this package registers the ``qpipe::`` operators with torch.library.
"""
from qpipe.ir import ops as ops  # noqa: F401  (registers torch.ops.qpipe.*)
from qpipe.ir.errors import QpipeError, PassFailure
from qpipe.ir.stages import Stage
from qpipe.ir.state import PipelineState
from qpipe.ir.opspec import OpKind, OpSpec, ScaleRule, spec_of
from qpipe.ir.policy import LayerPolicy, QuantSpec
from qpipe.ir.qtype import QType, qtype_of
from qpipe.ir.passes import (
    PassContext,
    PassResult,
    PassSpec,
    Pipeline,
    get_pass,
    list_passes,
    parse_pipeline,
    register,
    register_pipeline,
    run_pipeline,
)
from qpipe.ir.printer import print_ir
from qpipe.ir.verifier import verify

__all__ = [
    "QpipeError",
    "PassFailure",
    "Stage",
    "PipelineState",
    "OpKind",
    "OpSpec",
    "ScaleRule",
    "spec_of",
    "LayerPolicy",
    "QuantSpec",
    "QType",
    "qtype_of",
    "PassContext",
    "PassResult",
    "PassSpec",
    "Pipeline",
    "get_pass",
    "list_passes",
    "parse_pipeline",
    "register",
    "register_pipeline",
    "run_pipeline",
    "print_ir",
    "verify",
]
