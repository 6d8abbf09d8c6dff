"""calibrate-data: calibrate on real audio from a NeMo manifest (for comparison with zero-shot)."""
from __future__ import annotations

import os
import random

from torch.fx import GraphModule

from qpipe.frontends.audio import read_manifest
from qpipe.frontends.features import make_featurizer
from qpipe.ir.errors import QpipeError
from qpipe.ir.passes import Opt, PassContext, PassResult, register
from qpipe.ir.stages import Stage
from qpipe.passes.calibration import calibrate_from_batches


def _manifest_problem(path: str) -> str | None:
    if not path:
        raise QpipeError("calibrate-data needs manifest=PATH (a NeMo manifest of audio)")
    return None if os.path.isfile(path) else "is not an existing file"


@register(
    "calibrate-data",
    needs=Stage.OBSERVED,
    leaves=Stage.CALIBRATED,
    options={
        "manifest": Opt("", check=_manifest_problem),
        "utterances": Opt(32, lo=1),
        "seed": Opt(0, lo=0, hi=2**32 - 1),
    },
)
def calibrate_data(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Calibrate on real audio: mel features of up to ``utterances`` files from ``manifest``.

    Each utterance is one batch (no padding, so no padded frames skew ranges);
    the observers average the per-utterance ranges.
    """
    manifest = str(ctx.options["manifest"])
    if not manifest:
        raise QpipeError("calibrate-data needs manifest=PATH (a NeMo manifest of audio)")
    entries = read_manifest(manifest)
    rng = random.Random(int(ctx.options["seed"]))
    n = int(ctx.options["utterances"])
    if n < 1:
        raise QpipeError("calibrate-data: utterances must be >= 1")
    if len(entries) > n:
        entries = rng.sample(entries, n)
    featurizer = make_featurizer(ctx.state.preprocessor, ctx.state.featurizer_state)
    multiple = int(ctx.state.time_multiple or 1)
    batches = []
    for item in entries:
        feats = featurizer.file(item["audio_filepath"])
        t = (feats.shape[2] // multiple) * multiple
        if t >= max(2, multiple):
            batches.append(feats[:, :, :t].contiguous())
    if not batches:
        raise QpipeError(f"{manifest}: no utterance long enough to calibrate on")
    stats = calibrate_from_batches(gm, batches, f"data:{manifest}")
    ctx.state.calibration_inputs = batches[:4]
    return PassResult(gm, True, stats)
