"""Audio -> features for a saved model: the NeMo-free mel front end when its buffers
were saved, else NeMo's own preprocessor (imported only then: ~9 s)."""
from __future__ import annotations

from typing import Any, Optional

from qpipe.frontends.mel import MelFeaturizer


def make_featurizer(preprocessor_cfg: Optional[dict[str, Any]], featurizer_state: Optional[dict[str, Any]] = None):
    """The NeMo-free featurizer when the model's front-end buffers are known, else NeMo's own."""
    if featurizer_state:
        return MelFeaturizer(featurizer_state)
    from qpipe.frontends.nemo import NemoFeaturizer

    return NemoFeaturizer(preprocessor_cfg)
