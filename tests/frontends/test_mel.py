"""The NeMo-free mel front end matches NeMo's preprocessor."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.nemo


def test_mel_featurizer_matches_nemo(nemo_tiny_path):
    from qpipe.frontends.nemo import NemoFeaturizer as Featurizer
    from qpipe.frontends.mel import MelFeaturizer, mel_state_from_nemo
    from qpipe.frontends.nemo import read_nemo_config

    cfg = read_nemo_config(nemo_tiny_path)["preprocessor"]
    nemo_feat = Featurizer(cfg)
    state = mel_state_from_nemo(nemo_feat.module, 16000)
    assert state is not None
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 1.3) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)
    ours = MelFeaturizer(state)(audio)
    theirs = nemo_feat(audio)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=1e-3)
