"""A Citrinet (NeMo's ConvASREncoder with squeeze-excite, built from its config with
random weights and non-default BatchNorm) through the default passes: zero float ops,
every squeeze-excite integer, the output folder reloads and runs."""
from __future__ import annotations

import pytest
import torch
from torch.testing import FileCheck

from conftest import FAST_PIPELINE

pytestmark = [pytest.mark.nemo, pytest.mark.slow]


@pytest.fixture(scope="module")
def citrinet_path(tmp_path_factory):
    pytest.importorskip("nemo")
    from qpipe.frontends.nemo_configs import build_random_nemo

    return build_random_nemo("citrinet_tiny", str(tmp_path_factory.mktemp("nemo") / "citrinet_tiny.nemo"), seed=1)


def _float_ops(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)
               and n.meta["val"].is_floating_point())


def test_citrinet_goes_integer_only(citrinet_path, tmp_path):
    import qpipe.api as qp
    from qpipe.backends import open_folder
    from qpipe.frontends.nemo_configs import citrinet_tiny

    blocks = len(citrinet_tiny()["encoder"]["jasper"])
    out = tmp_path / "out"
    result = qp.quantize(citrinet_path, passes=FAST_PIPELINE, output=str(out), progress=False)
    assert _float_ops(result.float_gm) > 100  # the float graph, before
    last = result.run.records[-1]
    assert last.name == "eliminate-dead-float" and last.stats["float_ops"] == 0
    stats = next(r.stats for r in result.run.records if r.name == "substitute-int-ops")
    assert stats["mean"] == stats["sigmoid"] == stats["mul"] == blocks  # one squeeze-excite per block
    text = (out / "ir.txt").read_text()
    FileCheck().check("qpipe.quantize(%features").check("qpipe.masked_fill_int(").check("qpipe.mean_int(") \
        .check("qpipe.sigmoid_int(").check("qpipe.mul_requant(").check("qpipe.add_requant(").check("return").run(text)
    # (the int64 length arithmetic of the strided blocks, aten.div.Tensor_mode on i64[B], stays: it is not quantized)
    for op in ("aten.sigmoid", "aten.div.Tensor(", "aten.mul.Tensor(", "aten.conv1d", "aten.linear", "aten.relu", "f32["):
        FileCheck().check("qpipe.quantize(%features").check_not(op).check("return").run(text)
    FileCheck().check_count("qpipe.mean_int(", blocks, exactly=True).run(text)
    print(f"citrinet_tiny: {_float_ops(result.float_gm)} float ops before, 0 after; {result.metrics}")
    assert result.metrics["logprob_sqnr_db"] > 15 and result.metrics["argmax_agreement"] > 0.8, result.metrics
    qm = open_folder(str(out))
    logits = qm.logits_int(torch.randn(1, 80, 97))
    assert logits.dtype == torch.int16 and logits.shape[0] == 1 and logits.shape[2] == 29
