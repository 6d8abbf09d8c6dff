"""The bad inputs that need a real NeMo model: short audio against a QuartzNet's own guard,
in transcribe and in eval with the float model (issue 23, item 1). NeMo import: slow."""
from __future__ import annotations

import json

import pytest

from cli_fixtures import write_wav
from conftest import FAST_PIPELINE

pytestmark = [pytest.mark.nemo, pytest.mark.slow]


def test_short_audio_names_the_minimum_in_transcribe_and_eval(nemo_tiny_path, tmp_path, capsys):
    import torch

    import qpipe.api as qp
    from qpipe.cli import main

    out = tmp_path / "out"
    qp.quantize(nemo_tiny_path, FAST_PIPELINE, output=str(out), progress=False)
    meta = json.loads((out / "qpipe.json").read_text())
    ep = torch.export.load(str(out / "model.pt2"))
    lowers = sorted(int(r.lower) for r in ep.range_constraints.values())
    minimum = meta["input"]["min_time"]
    assert minimum in lowers and minimum >= 3  # QuartzNet's guard, recorded
    ms = round(1000 * (minimum * 160) / 16000)  # 10 ms hop, 512-point FFT, centred frames
    short = write_wav(tmp_path / "short.wav", (minimum - 1) * 0.01)
    ok = write_wav(tmp_path / "ok.wav", 0.6)
    capsys.readouterr()

    assert main(["transcribe", str(out), ok, short]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{ok}\t")
    error = captured.err.splitlines()[0]
    assert error.startswith(f"qpipe: error: {short}: audio too short") and f"needs at least {ms} ms ({minimum} frames)" in error

    manifest = tmp_path / "m.json"
    manifest.write_text("".join(json.dumps({"audio_filepath": p, "text": "a"}) + "\n" for p in (ok, short)))
    rc = main(["eval", nemo_tiny_path, str(out), "--manifest", str(manifest), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "entry 2" in err and f"needs at least {ms} ms ({minimum} frames)" in err
