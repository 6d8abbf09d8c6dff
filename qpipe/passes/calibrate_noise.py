"""calibrate-noise: calibrate on inputs that carry no information (baselines for zero-shot)."""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from qpipe.ir.errors import QpipeError
from qpipe.ir.passes import Opt, PassContext, PassResult, register
from qpipe.ir.stages import Stage
from qpipe.passes.calibration import calibrate_from_batches, input_shape


@register(
    "calibrate-noise",
    needs=Stage.OBSERVED,
    leaves=Stage.CALIBRATED,
    options={
        "kind": Opt("gaussian", choices=("gaussian", "zeros")),
        "batch": Opt(8, lo=1),
        "length": Opt(256, lo=2),
        "seed": Opt(0, lo=0, hi=2**32 - 1),
    },
)
def calibrate_noise(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Calibrate on Gaussian noise (kind=gaussian) or one all-zeros input (kind=zeros).

    These are the baselines that show what BN-statistics distillation buys.
    """
    o = ctx.options
    kind = str(o["kind"])
    if kind == "gaussian":
        shape = input_shape(gm, ctx.state, int(o["batch"]), int(o["length"]))
        x = torch.randn(shape, generator=torch.Generator().manual_seed(int(o["seed"])))
    elif kind == "zeros":
        x = torch.zeros(input_shape(gm, ctx.state, 1, int(o["length"])))
    else:
        raise QpipeError(f"calibrate-noise: kind must be gaussian or zeros, not '{kind}'")
    stats = calibrate_from_batches(gm, [x], f"noise:{kind}")
    ctx.state.calibration_inputs = [x]
    return PassResult(gm, True, stats)
