"""Audio -> features for a saved model: the NeMo-free mel front end when its buffers
were saved, else NeMo's own preprocessor (imported only then: ~9 s)."""
from __future__ import annotations

from typing import Any, Optional

from qpipe.frontends.mel import MIN_FRAMES, MelFeaturizer


def make_featurizer(preprocessor_cfg: Optional[dict[str, Any]], featurizer_state: Optional[dict[str, Any]] = None,
                    min_frames: int = MIN_FRAMES):
    """The NeMo-free featurizer when the model's front-end buffers are known, else NeMo's own.

    ``min_frames``: the fewest feature frames the model takes; shorter audio fails
    in one line that names the minimum length.
    """
    if featurizer_state:
        return MelFeaturizer(featurizer_state, min_frames=min_frames)
    from qpipe.frontends.nemo import NemoFeaturizer

    return NemoFeaturizer(preprocessor_cfg, min_frames=min_frames)
