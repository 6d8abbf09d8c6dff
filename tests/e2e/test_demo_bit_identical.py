"""The demo QuartzNet's integer logits are bit-identical to the pre-redesign code's.

``tests/fixtures/demo_quartznet_heldout_int_logits.json`` was written by the code at 0f41dcf
(default pipeline): for every held-out utterance, the shape, dtype, sha256 of the contiguous
integer logits' bytes and their sum.  Any change to a pass, a kernel, the lowering or the
output folder that moves a single integer shows here.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "demo_quartznet.nemo"
HELDOUT = ROOT / "data" / "eval" / "heldout"
FIXTURE = ROOT / "tests" / "fixtures" / "demo_quartznet_heldout_int_logits.json"

pytestmark = [pytest.mark.nemo, pytest.mark.slow]


def _open(folder: str):
    from qpipe.backends import open_folder

    return open_folder(folder)


def test_demo_quartznet_int_logits_match_the_pre_redesign_fixture(tmp_path):
    pytest.importorskip("nemo")
    import torch

    from qpipe.api import quantize

    rows = json.loads(FIXTURE.read_text())
    assert len(rows) == 130 and len({r["audio"] for r in rows}) == 130
    out = tmp_path / "demo_int8"
    quantize(str(MODEL), passes="default", output=str(out), progress=False)
    qm = _open(str(out))
    fz = qm.featurizer()
    differ = []
    for row in rows:
        lg = qm.logits_int(fz.file(str(HELDOUT / "audio" / row["audio"])))
        assert isinstance(lg, torch.Tensor)
        got = {
            "shape": list(lg.shape),
            "dtype": str(lg.dtype),
            "sha256": hashlib.sha256(lg.contiguous().numpy().tobytes()).hexdigest(),
        }
        want = {k: row[k] for k in got}
        if got != want:
            differ.append(f"{row['audio']}: {', '.join(k for k in got if got[k] != want[k])} differ"
                          f" (sum {int(lg.to(torch.int64).sum())}, fixture {row['sum']})")
    assert not differ, f"{len(differ)} of {len(rows)} utterances differ from the fixture; first: " + "; ".join(differ[:5])
