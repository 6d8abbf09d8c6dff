"""The stages a graph moves through; each pass names the stage it needs and leaves."""
from __future__ import annotations

import enum


class Stage(enum.IntEnum):
    FLOAT = 0  # float ATen graph straight from a frontend
    FOLDED = 1  # BatchNorm folded into convolutions
    OBSERVED = 2  # observers inserted, policy written into node.meta
    CALIBRATED = 3  # observers hold statistics from (synthetic) calibration data
    INTEGER = 4  # only qpipe:: integer ops between the input quantizer and the output

    @classmethod
    def parse(cls, name: "str | Stage") -> "Stage":
        if isinstance(name, Stage):
            return name
        try:
            return cls[str(name).upper()]
        except KeyError:
            raise ValueError(f"unknown stage '{name}' (known: {', '.join(s.name.lower() for s in cls)})") from None

    def __str__(self) -> str:
        return self.name.lower()


STAGE_META_KEY = "qpipe_stage"


def graph_stage(gm) -> Stage:
    """The stage recorded on a GraphModule (float when a frontend made it)."""
    return Stage(gm.meta.get(STAGE_META_KEY, Stage.FLOAT))


def set_graph_stage(gm, stage: Stage) -> None:
    gm.meta[STAGE_META_KEY] = int(stage)
