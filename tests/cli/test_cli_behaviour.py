"""Batch transcription, the recorded minimum input length, --help, --force, and an
interrupted run leaving nothing behind (issue 23, items 1 and 3)."""
from __future__ import annotations

import os

import pytest
import torch

from cli_fixtures import listing, quantized_folder, tiny_float_model, write_wav  # noqa: F401


def test_transcribe_reports_every_file(quantized_folder, tmp_path, capsys):
    import qpipe.api as qp
    from qpipe.cli import main

    good1, good2 = write_wav(tmp_path / "a.wav", 0.5), write_wav(tmp_path / "b.wav", 0.8)
    short, missing = write_wav(tmp_path / "s.wav", 0.03), str(tmp_path / "nope.wav")
    rc = main(["transcribe", quantized_folder, good1, short, missing, good2])
    out, err = capsys.readouterr()
    assert rc == 2
    expected = qp.transcribe(quantized_folder, [good1, good2])
    assert out.splitlines() == [f"{good1}\t{expected[0]}", f"{good2}\t{expected[1]}"]
    lines = err.splitlines()
    assert len(lines) == 3 and "Traceback" not in err
    assert lines[0].startswith(f"qpipe: error: {short}: audio too short")
    assert lines[1] == f"qpipe: error: no such audio file: {missing}"
    assert lines[2] == "qpipe: 2 of 4 files failed"
    # all good: exit 0, and the API's own transcribe raises on the first bad file
    assert main(["transcribe", quantized_folder, good1, good2]) == 0
    with pytest.raises(Exception, match="audio too short"):
        qp.transcribe(quantized_folder, [good1, short])


def test_recorded_minimum_is_the_programs_guard(quantized_folder):
    """qpipe.json's input.min_time is the lower bound export put on T; one frame less is a QpipeError, not a guard failure."""
    from qpipe.backends import open_folder
    from qpipe.ir.errors import QpipeError

    qm = open_folder(quantized_folder)
    ep = torch.export.load(os.path.join(quantized_folder, "model.pt2"))
    user = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs)
    symbol = user.meta["val"].shape[2].node.expr
    lower = int(ep.range_constraints[symbol].lower)
    assert qm.meta["input"]["min_time"] == lower == qm.min_frames == 6  # GuardedASR: T - 4 >= 2
    assert qm.logits_int(torch.randn(1, 8, lower)).shape[1] >= 1
    with pytest.raises(QpipeError, match=f"needs at least {lower}"):
        qm.logits_int(torch.randn(1, 8, lower - 1))
    with pytest.raises(AssertionError, match="Guard failed"):  # what the program itself says (the message qpipe now pre-empts)
        qm.runner.logits_int(torch.randn(1, 8, lower - 1))
    featurizer = qm.featurizer()
    assert featurizer.frames(featurizer.min_samples) == lower and featurizer.frames(featurizer.min_samples - 1) == lower - 1


def test_help_lists_every_subcommand(capsys):
    from qpipe.cli import SUBCOMMANDS, main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    listed = out.split("other commands: qpipe ", 1)[1].split()[0].split("|")
    assert listed == [c for c in SUBCOMMANDS if c != "run"] and "lm" in listed


def test_existing_out_is_replaced_only_with_force(quantized_folder, tmp_path):
    import shutil

    from qpipe.backends.folder import OutputSlot
    from qpipe.ir.errors import QpipeError

    out = str(tmp_path / "out")
    shutil.copytree(quantized_folder, out)
    first = set(os.listdir(out))
    with pytest.raises(QpipeError, match="already exists"):
        OutputSlot(out)
    slot = OutputSlot(out, force=True)  # the README's first command says --force: re-running it works
    assert os.path.isdir(slot.tmp) and set(os.listdir(out)) == first  # OUT stays until the new one is complete
    os.mkdir(os.path.join(slot.tmp, "new"))
    assert slot.commit() == out and os.listdir(out) == ["new"] and set(os.listdir(tmp_path)) == {"out"}


def test_interrupted_run_leaves_nothing(tmp_path):
    """Ctrl-C during a pass: no OUT, no temp folder, not even the parent folders -o asked for."""
    import qpipe.api as qp
    from qpipe.ir.passes import PassResult, register
    from qpipe.ir.stages import Stage

    @register("interrupt-for-test", needs=Stage.FOLDED, leaves=Stage.FOLDED)
    def interrupt(gm, ctx):
        """Acts as if the user pressed Ctrl-C."""
        raise KeyboardInterrupt

    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(KeyboardInterrupt):
        qp.quantize(tiny_float_model(), "fold-bn,interrupt-for-test", output=str(out), progress=False)
    assert listing(tmp_path) == set()
