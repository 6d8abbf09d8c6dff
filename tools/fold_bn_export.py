#!/usr/bin/env python3
"""Export a .nemo CTC model with its BatchNorm folded into the convolutions: no statistics left.

What a model from outside often looks like (an ONNX or TorchScript export folds
BatchNorm): the same numbers as the .nemo, but no running mean or variance that
Q-ASR's BN-statistics matching could use.  Writes into OUT_DIR (default a cache
folder under /tmp, never committed):

* ``model.pt2``   torch.export program of features (B, F, T) -> log-probs, BN folded
                  (dynamic batch and time); no batch_norm op, no running statistics;
* ``frontend.pt`` the float front end and decoding facts (preprocessor config, mel
                  buffers, vocabulary, time multiple), so qpipe can feed and decode it;
* ``model.onnx``  the same float graph as ONNX (opset 17, dynamic batch and time), for
                  ONNX Runtime's quantize_static.

    tools/fold_bn_export.py models/demo_quartznet.nemo [OUT_DIR]

``load_folded(OUT_DIR)`` gives the qpipe FloatModel (for ``qpipe.api.quantize``).
The folding itself is qpipe's ``fold-bn`` pass with its BN targets thrown away, then a
fresh ``torch.export`` of the folded graph, so nothing of the statistics survives.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_DIR = "/tmp/qpipe-cache/demo_quartznet_bnfolded"


class _Frozen(torch.nn.Module):
    """Holds an export's module unregistered: the ONNX exporter's train(False) must not reach it."""

    def __init__(self, gm: torch.nn.Module):
        super().__init__()
        gm._forward_pre_hooks.clear()  # export's input-shape check cannot be traced
        for p in list(gm.parameters()) + list(gm.buffers()):
            p.requires_grad_(False)  # traced as ONNX initializers
        object.__setattr__(self, "gm", gm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gm(x)


def export(nemo_path: str, out_dir: str) -> dict:
    from qpipe.frontends.nemo import load_nemo
    from qpipe.frontends.torch import from_module
    from qpipe.ir.meta import BN_TARGET
    from qpipe.ir.passes import run_pipeline
    import qpipe.passes  # noqa: F401

    fm = load_nemo(nemo_path)
    folded = run_pipeline(copy.deepcopy(fm.gm), "fold-bn", state=fm.pipeline_state(), progress=False)
    gm = folded.gm
    for n in gm.graph.nodes:
        n.meta.pop(BN_TARGET, None)
    example = fm.example_inputs
    fresh = from_module(gm, example, time_multiple=fm.time_multiple, max_time=fm.max_time or 16384)
    names = " ".join(str(n.target) for n in fresh.gm.graph.nodes)
    assert "batch_norm" not in names, "a BatchNorm op survived the fold"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ep = torch.export.export(fresh.gm, example, dynamic_shapes=({0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO},),
                             strict=False)
    torch.export.save(ep, str(out / "model.pt2"))
    torch.save({"preprocessor": fm.preprocessor, "featurizer_state": fm.featurizer_state,
                "vocabulary": fm.vocabulary, "time_multiple": fm.time_multiple, "max_time": fm.max_time,
                "input_shape": list(fm.input_shape), "source": os.path.abspath(nemo_path),
                "info": dict(fm.info)}, out / "frontend.pt")
    torch.onnx.export(_Frozen(fresh.gm), example, str(out / "model.onnx"), dynamo=False, opset_version=17,
                      input_names=["features"], output_names=["logprobs"],
                      dynamic_axes={"features": {0: "B", 2: "T"}, "logprobs": {0: "B", 1: "T_out"}})
    with torch.no_grad():  # the folded graph computes what the .nemo does
        x = torch.randn(2, fm.input_shape[1], 256, generator=torch.Generator().manual_seed(0))
        diff = float((fm.gm(x) - fresh.gm(x)).abs().max())
    n_bn = sum(1 for n in fm.gm.graph.nodes if "batch_norm" in str(n.target))
    return {"out": str(out), "batchnorms_folded": n_bn, "max_abs_logprob_diff": diff,
            "files": sorted(p.name for p in out.iterdir())}


def load_folded(out_dir: str):
    """The exported folded model as a qpipe FloatModel (no BN, so no statistics to match)."""
    from qpipe.frontends.torch import from_exported_program

    out = Path(out_dir)
    meta = torch.load(out / "frontend.pt", weights_only=False)
    ep = torch.export.load(str(out / "model.pt2"))
    shape = meta["input_shape"]
    fm = from_exported_program(ep, (torch.randn(*shape),), time_dim=2, time_multiple=meta["time_multiple"],
                               max_time=meta["max_time"], kind="torch:bn-folded-export", source=str(out / "model.pt2"))
    fm.preprocessor = meta["preprocessor"]
    fm.featurizer_state = meta["featurizer_state"]
    fm.vocabulary = meta["vocabulary"]
    fm.info = {**meta["info"], "bn_folded_from": meta["source"]}
    return fm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a .nemo CTC model")
    ap.add_argument("out_dir", nargs="?", default=DEFAULT_DIR)
    args = ap.parse_args(argv)
    info = export(args.model, args.out_dir)
    print(f"folded {info['batchnorms_folded']} BatchNorms; wrote {info['out']}: {', '.join(info['files'])}; "
          f"max |log-prob difference| to the .nemo graph on random input: {info['max_abs_logprob_diff']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
