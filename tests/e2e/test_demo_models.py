"""The bundled demo QuartzNet, quantized with the default (data-free) pipeline, keeps its accuracy."""
from __future__ import annotations

from pathlib import Path

import pytest

from qpipe.api import quantize
from qpipe.asr.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "demo_quartznet.nemo"
HELDOUT = ROOT / "data" / "eval" / "heldout" / "manifest.json"
CER_CEILING = 60.0  # the committed model scores ~32 % on the held-out set; random weights ~100 %


@pytest.fixture(scope="module")
def demo_int8(tmp_path_factory):
    """The bundled QuartzNet through the default (data-free) pipeline, once for this module."""
    out = tmp_path_factory.mktemp("demo") / "demo_int8"
    quantize(str(MODEL), passes="default", output=str(out), progress=False)
    return str(out)


@pytest.mark.nemo
@pytest.mark.slow
def test_demo_quartznet_int8_default_pipeline_keeps_accuracy(demo_int8):
    result = evaluate(str(MODEL), [demo_int8], str(HELDOUT), limit=40, progress=False)
    rows = {r["kind"]: r for r in result["models"]}
    assert result["utterances"] == 40
    # a trained model (random weights give ~100 % CER), and int8 stays close to it
    assert rows["float"]["cer"] < CER_CEILING, rows["float"]
    assert abs(rows["quantized"]["cer"] - rows["float"]["cer"]) <= 2.0, rows


@pytest.mark.nemo
@pytest.mark.slow
def test_demo_lm_lowers_the_word_error_rate_of_float_and_int8(demo_int8):
    from qpipe.asr.decode import Decoding

    greedy = evaluate(str(MODEL), [demo_int8], str(HELDOUT), limit=30, progress=False)
    beam = evaluate(str(MODEL), [demo_int8], str(HELDOUT), limit=30, progress=False,
                    decoding=Decoding(lm_path=str(ROOT / "models" / "demo_lm.arpa.gz")))
    assert beam["decoding"]["lm_order"] == 3
    for g, b in zip(greedy["models"], beam["models"]):
        # the demo LM takes ~18 WER points off the float model on the full held-out set
        assert b["wer"] < g["wer"] - 5.0, (g, b)
    float_wer, int_wer = (r["wer"] for r in beam["models"])
    assert abs(int_wer - float_wer) <= 3.0, beam["models"]
