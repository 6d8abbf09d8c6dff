"""One test group per pass on a toy QuartzNet block: FileCheck on printed IR plus numerics."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import FileCheck

from qpipe.api import compare_outputs
from qpipe.ir import QpipeError, Stage, print_ir
from qpipe.ir.meta import BN_TARGET, QPARAMS
from qpipe.ir.passes import run_pipeline
from qpipe.ir.stages import graph_stage
from qpipe.ir.verifier import integer_region

from conftest import FAST_CALIBRATION, FAST_PIPELINE


def _run(fm, pipeline):
    state = fm.pipeline_state()
    run = run_pipeline(fm.gm, pipeline, state=state, progress=False)
    return run, state


def test_fold_bn_removes_bn_and_keeps_numbers(tiny_float_model):
    ref = copy.deepcopy(tiny_float_model.gm)
    run, _ = _run(tiny_float_model, "fold-bn")
    gm = run.gm
    text = print_ir(gm)
    FileCheck().check("// stage: folded").check_not("aten.batch_norm").check_count("aten.conv1d", 5, exactly=True).run(text)
    assert run.records[0].stats["folded"] == 3
    x = torch.randn(3, 8, 40)
    torch.testing.assert_close(gm(x), ref(x), rtol=1e-4, atol=1e-5)
    targets = [n for n in gm.graph.nodes if BN_TARGET in n.meta]
    assert len(targets) == 3
    assert all(t.meta[BN_TARGET]["std"].min() > 0 for t in targets)


def test_fold_bn_rejects_bn_without_conv():
    from qpipe.frontends.torch import from_module

    class NoConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(x) * 2

    fm = from_module(NoConv().eval(), (torch.randn(2, 4, 10),))
    with pytest.raises(QpipeError, match="does not follow a convolution"):
        _run(fm, "fold-bn")


def test_insert_observers_policy_and_placement(tiny_float_model):
    run, _ = _run(tiny_float_model, "fold-bn,insert-observers{act=percentile:99.9}")
    text = print_ir(run.gm)
    # input observed; the conv read only by ReLU is observed after the ReLU; the head gets 16 bits
    FileCheck().check("%x = input").check("module[qpipe_obs_0](%x) {bits=8, method=percentile, percentile=99.9, role=input}") \
        .check("aten.conv1d").check("out=after-activation").check("aten.relu").check("module[qpipe_obs") \
        .check("aten.add.Tensor").check("aten.relu").check("module[qpipe_obs") \
        .check("aten.conv1d").check("{bits=16, method=minmax, role=output}").run(text)
    assert graph_stage(run.gm) == Stage.OBSERVED


def test_calibrate_synthetic_reduces_kl_and_sets_scales(tiny_float_model):
    run, state = _run(tiny_float_model, f"fold-bn,insert-observers,{FAST_CALIBRATION}")
    stats = run.records[-1].stats
    assert stats["kl_last"] < stats["kl_first"]
    scales = [n.meta[QPARAMS]["scale"] for n in run.gm.graph.nodes if n.op == "call_module"]
    assert scales and all(s > 0 for s in scales)
    assert state.calibration_inputs[0].shape == (4, 8, 48)


def test_calibrate_synthetic_is_deterministic_for_a_seed(tiny_float_model):
    fm2 = copy.deepcopy(tiny_float_model)
    run1, _ = _run(tiny_float_model, f"fold-bn,insert-observers,{FAST_CALIBRATION}")
    run2, _ = _run(fm2, f"fold-bn,insert-observers,{FAST_CALIBRATION}")
    s1 = [n.meta[QPARAMS]["scale"] for n in run1.gm.graph.nodes if n.op == "call_module"]
    s2 = [n.meta[QPARAMS]["scale"] for n in run2.gm.graph.nodes if n.op == "call_module"]
    assert s1 == s2


def test_calibrate_synthetic_keeps_inputs_normalized_like_the_preprocessor(tiny_float_model):
    fm = copy.deepcopy(tiny_float_model)
    state = fm.pipeline_state()
    state.preprocessor = {"normalize": "per_feature"}  # what NeMo's mel front ends say
    run = run_pipeline(fm.gm, f"fold-bn,insert-observers,{FAST_CALIBRATION}", state=state, progress=False)
    assert run.records[-1].stats["input_norm"] == "per_feature"
    x = state.calibration_inputs[0]
    torch.testing.assert_close(x.mean(dim=-1), torch.zeros(x.shape[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=-1), torch.ones(x.shape[:2]), atol=1e-3, rtol=0)
    # without that config (a plain torch module) auto leaves the input free
    run2, state2 = _run(copy.deepcopy(tiny_float_model), f"fold-bn,insert-observers,{FAST_CALIBRATION}")
    assert run2.records[-1].stats["input_norm"] == "none"
    assert state2.calibration_inputs[0].std(dim=-1).max() < 0.9
    with pytest.raises(QpipeError, match="input_norm must be"):
        _run(copy.deepcopy(tiny_float_model), "fold-bn,insert-observers,calibrate-synthetic{input_norm=global}")


def test_substitute_int_ops_makes_integer_graph(tiny_float_model):
    ref = copy.deepcopy(tiny_float_model.gm)
    run, state = _run(tiny_float_model, f"fold-bn,insert-observers,{FAST_CALIBRATION},substitute-int-ops")
    gm = run.gm
    text = print_ir(gm)
    FileCheck().check("// stage: integer").check("qpipe.quantize(%x").check(": i8[B,8,T]") \
        .check("qpipe.conv1d_acc").check(": i32[").check("qpipe.requant").check(": i8[") \
        .check("qpipe.add_requant").check("lo=0").check("qpipe.conv1d_acc").check("qpipe.requant") \
        .check("bits=16) {").check(": i16[").run(text)
    stats = run.records[-1].stats
    assert stats["conv"] == 5 and stats["add"] == 1 and stats["quantize"] == 1
    for node in integer_region(gm):
        assert not node.meta["val"].is_floating_point(), node.name
    metrics = compare_outputs(ref, gm, state.calibration_inputs)
    assert metrics["logprob_sqnr_db"] > 25, metrics


def test_fuse_requant_is_exact(tiny_float_model):
    run, _ = _run(tiny_float_model, f"fold-bn,insert-observers,{FAST_CALIBRATION},substitute-int-ops")
    unfused = copy.deepcopy(run.gm)
    run2 = run_pipeline(run.gm, "fuse-requant", progress=False)
    text = print_ir(run2.gm)
    FileCheck().check_count("qpipe.conv1d_rq", 5, exactly=True).check_not("qpipe.requant(").run(text)
    FileCheck().check_not("qpipe.conv1d_acc").run(text)
    x = torch.randn(2, 8, 37)
    assert torch.equal(unfused(x), run2.gm(x))


def test_eliminate_dead_float_drops_float_weights(tiny_float_model):
    run, _ = _run(tiny_float_model, FAST_PIPELINE)
    gm = run.gm
    stats = run.records[-1].stats
    assert stats["float_ops"] == 0 and stats["removed_params"] > 0
    floats = [name for name, t in list(gm.named_buffers()) + list(gm.named_parameters()) if t.is_floating_point()]
    assert floats == []
    text = print_ir(gm, include_params=False)
    FileCheck().check("qpipe.quantize").check_not("aten.conv1d").check_not("aten.add").check_not("f32[B,12").run(text)


def test_eliminate_dead_float_names_float_op_left_inside(tiny_float_model):
    from qpipe.ir.passes import PassResult, register

    @register("sneak-float-for-test", needs=Stage.INTEGER, leaves=Stage.INTEGER)
    def sneak(gm, ctx):
        """Puts a float op after the input quantizer (what a broken pass might do)."""
        q = next(n for n in gm.graph.nodes if n.op == "call_function" and "quantize" in str(n.target))
        with gm.graph.inserting_after(q):
            f = gm.graph.call_function(torch.ops.aten._to_copy.default, (q,), {"dtype": torch.float32})
        user = next(u for u in q.users if u is not f)
        user.replace_input_with(q, f)
        from qpipe.ir.shapes import propagate_meta

        gm.recompile()
        propagate_meta(gm)  # a pass keeps meta["val"] current; if this raises, the test fails here
        assert f.meta["val"].dtype == torch.float32  # the smuggled op is visibly float
        return PassResult(gm, True)

    from qpipe.ir.passes import Instrumentation

    with pytest.raises(QpipeError, match=r"float op\(s\) remain|not an integer op") as err:
        run_pipeline(
            tiny_float_model.gm,
            f"fold-bn,insert-observers,{FAST_CALIBRATION},substitute-int-ops,sneak-float-for-test,eliminate-dead-float",
            progress=False,
            instrument=Instrumentation(verify_each=False),
        )
    # the smuggling pass itself ran clean; what caught the float op is the pass after it
    assert getattr(err.value, "pass_name", None) == "eliminate-dead-float", err.value
    assert "sneak-float-for-test" in err.value.ran_before


def test_calibrate_noise_baselines(tiny_float_model):
    fm2, fm3 = copy.deepcopy(tiny_float_model), copy.deepcopy(tiny_float_model)
    run, state = _run(tiny_float_model, "fold-bn,insert-observers,calibrate-noise{kind=zeros,length=32}")
    assert run.records[-1].stats["batches"] == 1
    run2, state2 = _run(fm2, "fold-bn,insert-observers,calibrate-noise{kind=gaussian,batch=2,length=32}")
    # one (2, 8, 32) batch of unit Gaussian noise, every observer filled from it
    stats2 = run2.records[-1].stats
    assert stats2["batches"] == 1 and stats2["observers"] == run.records[-1].stats["observers"] > 0
    (x,) = state2.calibration_inputs
    assert x.shape == (2, 8, 32) and 0.7 < float(x.std()) < 1.3
    # the input observer saw the noise (zeros give it no range at all), and said where it came from
    amax = [n.meta[QPARAMS]["amax"] for n in run.gm.graph.nodes if QPARAMS in n.meta]
    amax2 = [n.meta[QPARAMS]["amax"] for n in run2.gm.graph.nodes if QPARAMS in n.meta]
    assert len(amax2) == len(amax) == stats2["observers"]
    assert amax[0] == 0.0 and amax2[0] > 1.0 and all(a > 0 for a in amax2)
    assert {n.meta[QPARAMS]["calibration"] for n in run2.gm.graph.nodes if QPARAMS in n.meta} == {"noise:gaussian"}
    with pytest.raises(QpipeError, match="kind must be"):
        _run(fm3, "fold-bn,insert-observers,calibrate-noise{kind=pink}")


def test_lower_activation_bits_reach_the_integer_ops(tiny_float_model):
    run, _ = _run(tiny_float_model, FAST_PIPELINE.replace("insert-observers", "insert-observers{a_bits=6}"))
    text = print_ir(run.gm)
    FileCheck().check("qpipe.conv1d_rq").check("lo=-32, hi=31, bits=6, f32=true)").run(text)
