"""Ops as data: every qpipe:: op has a spec naming its arguments, the verifier's
tables come from the specs, and the qtype check catches scales that do not follow."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import FAST_PIPELINE
from qpipe.ir import QpipeError, Stage, verify
from qpipe.ir.graph_utils import fetch_attr
from qpipe.ir.opspec import OpKind, all_specs, spec_of
from qpipe.ir.passes import run_pipeline
from qpipe.ir.policy import QuantSpec
from qpipe.ir.qtype import QTYPE, QType, qtype_of
from qpipe.ir.verifier import INTEGER_OPS

Q = torch.ops.qpipe


def test_every_integer_op_has_a_spec_in_the_verifier_table():
    names = {spec.name for spec in all_specs()}
    assert {"quantize", "conv1d_acc", "conv1d_rq", "conv2d_acc", "conv2d_rq", "linear_acc", "linear_rq",
            "requant", "add_requant", "clamp_int"} <= names
    for spec in all_specs():
        assert spec.arg_names[0]  # the schema's names
        if spec.kind is not OpKind.QUANTIZE:
            assert spec.op in INTEGER_OPS, spec.name
        if spec.kind is OpKind.ACCUMULATE:
            fused = next(s for s in all_specs() if s.name == spec.fused)
            assert fused.kind is OpKind.REQUANTIZE and fused.weight == spec.weight
        if spec.multipliers:
            assert spec.shift and spec.clamp and spec.out_bits


def test_bind_reads_arguments_by_name():
    spec = spec_of(type("N", (), {"op": "call_function", "target": Q.requant.default})())
    assert spec.arg_names == ("acc", "m", "s", "channel_dim", "lo", "hi", "bits", "f32")
    values = dict(zip(spec.arg_names, range(7)))
    assert spec.args_from({**values, "unused": 9}) == tuple(range(7))
    with pytest.raises(ValueError, match="no value for bits"):
        spec.args_from({k: v for k, v in values.items() if k != "bits"})


@pytest.fixture
def integer_gm(tiny_float_model):
    run = run_pipeline(tiny_float_model.gm, FAST_PIPELINE, state=tiny_float_model.pipeline_state(), progress=False)
    return run.gm


def test_every_integer_tensor_carries_its_qtype(integer_gm):
    rq = [n for n in integer_gm.graph.nodes if n.target is Q.conv1d_rq.default]
    assert rq
    for node in rq:
        q = qtype_of(node)
        assert q.bits in (8, 16) and not q.per_channel and q.zero_point == 0
        w = qtype_of(spec_of(node).bind(node)["w"])
        assert w.per_channel and w.axis == 0
    verify(integer_gm, Stage.INTEGER)


def test_verifier_catches_a_multiplier_that_does_not_give_the_output_scale(integer_gm):
    gm = copy.deepcopy(integer_gm)
    node = next(n for n in gm.graph.nodes if n.target is Q.conv1d_rq.default)
    m_node = spec_of(node).bind(node)["m"]
    fetch_attr(gm, m_node.target).mul_(3).floor_divide_(2)  # 1.5x the multiplier: the numbers would be wrong
    with pytest.raises(QpipeError, match=r"\(m, s\) = .* does not take scale"):
        verify(gm, Stage.INTEGER)


def test_verifier_catches_missing_and_inconsistent_qtypes(integer_gm):
    gm = copy.deepcopy(integer_gm)
    add = next(n for n in gm.graph.nodes if n.target is Q.add_requant.default)
    del add.meta[QTYPE]
    with pytest.raises(QpipeError, match="add_requant.*no meta\\['qtype'\\]"):
        verify(gm, Stage.INTEGER)
    gm = copy.deepcopy(integer_gm)
    layout = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.transpose.int)
    q = qtype_of(layout)
    layout.meta[QTYPE] = QType.of(q.bits, q.scale * 2)
    with pytest.raises(QpipeError, match="layout op changes the qtype"):
        verify(gm, Stage.INTEGER)
    gm = copy.deepcopy(integer_gm)
    quant = next(n for n in gm.graph.nodes if n.target is Q.quantize.default)
    quant.meta[QTYPE] = QType.of(16, qtype_of(quant).scale)
    with pytest.raises(QpipeError, match="does not fit its dtype"):
        verify(gm, Stage.INTEGER)


def test_policy_specs_are_validated_and_frozen():
    spec = QuantSpec.activation("percentile:99.9", 8)
    assert spec.method == "percentile" and spec.percentile == 99.9
    with pytest.raises(QpipeError, match="bit width must be an integer in 2..16, got 99"):
        QuantSpec(bits=99)
    with pytest.raises(QpipeError, match="percentile must be in"):
        QuantSpec.activation("percentile:20", 8)
    with pytest.raises(Exception):
        spec.bits = 4  # frozen
    with pytest.raises(ValueError, match="symmetric"):
        QType(8, 0.1, zero_point=3)
