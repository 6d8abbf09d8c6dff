"""Pipeline strings, the stage check, instrumentation and error wording."""
from __future__ import annotations

import os
import textwrap

import pytest
import torch
from torch.testing import FileCheck

from qpipe.ir import PassFailure, QpipeError, Stage
from qpipe.ir.passes import (
    Instrumentation,
    PassResult,
    check_stages,
    load_pass_file,
    parse_pipeline,
    register,
    run_pipeline,
)


def test_default_expands_to_the_six_passes():
    p = parse_pipeline("default")
    assert [s.spec.name for s in p.steps] == [
        "fold-bn",
        "insert-observers",
        "calibrate-synthetic",
        "substitute-int-ops",
        "fuse-requant",
        "eliminate-dead-float",
    ]


def test_options_are_typed_and_written_back():
    p = parse_pipeline("fold-bn,insert-observers{act=minmax,a_bits=6},calibrate-synthetic{steps=3,lr=0.5}")
    assert p.steps[1].options["a_bits"] == 6
    assert p.steps[2].options["lr"] == 0.5
    assert str(p) == "fold-bn,insert-observers{a_bits=6,act=minmax},calibrate-synthetic{lr=0.5,steps=3}"
    assert "batch=4" in p.full_string()


@pytest.mark.parametrize(
    "text, message",
    [
        ("fold-bn,bogus", "unknown pass 'bogus'"),
        ("fold-bm", "did you mean 'fold-bn'"),
        ("insert-observers{nope=1}", "has no option 'nope'"),
        ("calibrate-synthetic{steps=many}", "not a valid int"),
        ("insert-observers{act=minmax", "unbalanced"),
        ("", "empty pipeline"),
        ("default{x=1}", "takes no options"),
    ],
)
def test_bad_pipelines_say_what_is_wrong(text, message):
    with pytest.raises(QpipeError, match=message):
        parse_pipeline(text)


def test_stage_mismatch_is_found_before_running():
    with pytest.raises(QpipeError, match="'substitute-int-ops' needs a calibrated graph, but gets a folded graph after 'fold-bn'"):
        check_stages(parse_pipeline("fold-bn,substitute-int-ops"), Stage.FLOAT)


def test_failing_pass_is_named_with_what_ran_before(tiny_float_model):
    @register("explode-for-test", needs=Stage.FOLDED, leaves=Stage.FOLDED)
    def explode(gm, ctx):
        """Always fails."""
        raise RuntimeError("boom")

    with pytest.raises(PassFailure, match=r"pass 'explode-for-test' failed \(after: fold-bn\): RuntimeError: boom"):
        run_pipeline(tiny_float_model.gm, "fold-bn,explode-for-test", progress=False)


def test_verifier_runs_after_each_pass(tiny_float_model):
    @register("unfold-for-test", needs=Stage.FLOAT, leaves=Stage.FOLDED)
    def claims_folded(gm, ctx):
        """Claims a folded graph but leaves BatchNorm in place."""
        return PassResult(gm, False)

    with pytest.raises(PassFailure, match="BatchNorm left unfolded"):
        run_pipeline(tiny_float_model.gm, "unfold-for-test", progress=False)


def test_print_diff_and_dump_dir(tiny_float_model, tmp_path):
    out = []
    inst = Instrumentation(print_diff=True, print_after_change=True, dump_dir=str(tmp_path), write=out.append)
    run_pipeline(tiny_float_model.gm, "fold-bn", instrument=inst, progress=False)
    text = "".join(out)
    FileCheck().check("IR after fold-bn").check_not("aten.batch_norm").check("diff after fold-bn").check("-%batch_norm").run(text)
    assert sorted(os.listdir(tmp_path)) == ["000_input.txt", "001_fold-bn.txt"]
    assert open(tmp_path / "001_fold-bn.txt").read().startswith("// stage: folded")


def test_no_change_is_reported(tiny_float_model):
    @register("noop-for-test")
    def noop(gm, ctx):
        """Does nothing."""
        return PassResult(gm, False)

    out = []
    run_pipeline(tiny_float_model.gm, "noop-for-test", instrument=Instrumentation(print_diff=True, write=out.append), progress=False)
    assert "no change" in "".join(out)


def test_load_pass_file_registers_user_pass(tmp_path):
    path = tmp_path / "mypass.py"
    path.write_text(
        textwrap.dedent(
            '''
            from qpipe.ir.passes import register, PassResult

            @register("user-count-nodes")
            def count(gm, ctx):
                """Counts call nodes."""
                return PassResult(gm, False, {"calls": sum(n.op == "call_function" for n in gm.graph.nodes)})
            '''
        )
    )
    assert load_pass_file(str(path)) == ["user-count-nodes"]
    with pytest.raises(QpipeError, match="no such file"):
        load_pass_file(str(tmp_path / "missing.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("this is not python(\n")
    with pytest.raises(QpipeError, match="bad.py: SyntaxError"):
        load_pass_file(str(bad))


def test_a_pass_name_is_registered_once():
    @register("twice-for-test")
    def first(gm, ctx):
        """First."""
        return PassResult(gm, False)

    with pytest.raises(QpipeError, match="pass 'twice-for-test' is already registered"):
        @register("twice-for-test")
        def second(gm, ctx):
            """Would silently replace the first."""
            return PassResult(gm, False)

    with pytest.raises(QpipeError, match="already the name of a pipeline"):
        register("default")(first)


def test_runner_owns_recompile_and_shapes_and_times_the_verifier(tiny_float_model):
    """A pass that edits the graph and does no bookkeeping still leaves fresh code and shapes."""
    import torch

    @register("relu-to-hardtanh-for-test", needs=Stage.FLOAT, leaves=Stage.FLOAT)
    def swap(gm, ctx):
        """Turns every ReLU into hardtanh(0, 0.5) without recompiling or re-deriving meta."""
        n = 0
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.aten.relu.default:
                node.target = torch.ops.aten.hardtanh.default
                node.args = (node.args[0], 0.0, 0.5)
                node.meta.pop("val", None)
                n += 1
        return PassResult(gm, n > 0, {"swapped": n})

    run = run_pipeline(tiny_float_model.gm, "relu-to-hardtanh-for-test", progress=False)
    assert "hardtanh" in run.gm.code  # recompiled by the runner
    swapped = [n for n in run.gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.hardtanh.default]
    assert len(swapped) == 2 and all("val" in n.meta for n in swapped)  # meta re-derived (the verifier demands it)
    record = run.records[0]
    assert record.verify_seconds > 0 and record.seconds > 0
    with torch.no_grad():
        assert float(run.gm(torch.randn(1, 8, 16)).exp().sum(-1).mean()) == pytest.approx(1.0, abs=1e-5)
