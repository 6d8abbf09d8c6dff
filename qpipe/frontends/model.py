"""What a frontend hands to the pipeline: the float graph and how to feed it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.fx import GraphModule

from qpipe.ir.state import PipelineState


@dataclass
class FloatModel:
    """A float ATen graph (``torch.export``, dynamic time axis) and its surroundings.

    ``input_shape`` is the example input's shape, ``(batch, features, time)`` for
    ASR encoders; ``time_multiple`` is what the time length must be a multiple of
    (the Conformer's subsampling). ``preprocessor`` is the NeMo config of the float
    mel front end that stays outside the graph; ``vocabulary`` maps CTC classes to
    text (blank is the last class, as in NeMo).
    """

    gm: GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    kind: str = "torch"
    source: str = ""
    time_dim: Optional[int] = 2
    time_multiple: int = 1
    max_time: Optional[int] = None
    preprocessor: Optional[dict[str, Any]] = None
    vocabulary: Optional[list[str]] = None
    float_tail: Optional[str] = None
    featurizer_state: Optional[dict[str, Any]] = None  # frontends.mel: the float front end without NeMo
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.example_inputs[0].shape)

    def pipeline_state(self) -> PipelineState:
        """The facts passes may need (synthetic calibration builds inputs of this shape)."""
        return PipelineState(
            input_shape=self.input_shape,
            time_dim=self.time_dim,
            time_multiple=self.time_multiple,
            max_time=self.max_time,
            source=self.source,
            kind=self.kind,
            preprocessor=self.preprocessor,
            featurizer_state=self.featurizer_state,
        )
