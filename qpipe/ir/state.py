"""What passes share besides the graph: facts from the frontend and results of
earlier passes, as one typed object (a misspelt key is an AttributeError at the
line that made it, not a silent default three passes later)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class PipelineState:
    """``input_shape``: the example input's shape, (batch, features, time) for ASR;
    ``time_dim``: its dynamic time axis (None: none; -1: the last);
    ``time_multiple``: what a time length must be a multiple of (subsampling);
    ``preprocessor``/``featurizer_state``: the float front end (calibrate-data reads
    audio through it); ``calibration_inputs``: the batches the calibration pass ran
    on (the report compares float and integer outputs on them); ``extra``: what
    user passes want to hand to later passes."""

    input_shape: Optional[tuple[int, ...]] = None
    time_dim: Optional[int] = -1
    time_multiple: int = 1
    max_time: Optional[int] = None
    source: str = ""
    kind: str = "torch"
    preprocessor: Optional[dict[str, Any]] = None
    featurizer_state: Optional[dict[str, Any]] = None
    seed: int = 0
    calibration_inputs: list[torch.Tensor] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
