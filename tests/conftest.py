"""Test set-up: import qpipe from this checkout, small shared models."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Without a GPU, the CUDA path's Triton kernels run in Triton's interpreter (numpy, on CPU tensors), so that
# their integers are tested here too; Triton reads this when a kernel is defined, so before qpipe is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import qpipe.passes  # noqa: E402,F401  (registers built-in passes)


def randomize_batchnorm(*bns: torch.nn.Module, seed: int = 0) -> None:
    """Non-default BN statistics and affine parameters (the defaults make BN matching trivial)."""
    gen = torch.Generator().manual_seed(seed)
    for bn in bns:
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.bias.data.copy_(torch.randn(c, generator=gen) * 0.1)


class TinyASR(torch.nn.Module):
    """QuartzNet's building blocks at toy size: separable conv+BN+ReLU, a residual block, a CTC head."""

    def __init__(self, features: int = 8, channels: int = 12, classes: int = 6):
        super().__init__()
        self.dw = torch.nn.Conv1d(features, features, 5, padding=2, groups=features, bias=False)
        self.pw = torch.nn.Conv1d(features, channels, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm1d(channels)
        self.conv2 = torch.nn.Conv1d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm1d(channels)
        self.res = torch.nn.Conv1d(channels, channels, 1, bias=False)
        self.bn_res = torch.nn.BatchNorm1d(channels)
        self.head = torch.nn.Conv1d(channels, classes, 1, bias=True)
        self.dropout = torch.nn.Dropout(0.1)
        randomize_batchnorm(self.bn1, self.bn2, self.bn_res)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(torch.relu(self.bn1(self.pw(self.dw(x)))))
        y = torch.relu(self.bn2(self.conv2(h)) + self.bn_res(self.res(h)))
        return torch.log_softmax(self.head(y).transpose(1, 2), dim=-1)


@pytest.fixture
def tiny_float_model():
    from qpipe.frontends.torch import from_module

    torch.manual_seed(0)
    module = TinyASR().eval()
    return from_module(module, (torch.randn(2, 8, 32),))


FAST_CALIBRATION = "calibrate-synthetic{steps=20,batch=4,length=48,lr=0.05}"
FAST_PIPELINE = f"fold-bn,insert-observers,{FAST_CALIBRATION},substitute-int-ops,fuse-requant,eliminate-dead-float"


@pytest.fixture(scope="session")
def nemo_tiny_path(tmp_path_factory):
    pytest.importorskip("nemo")
    from qpipe.frontends.nemo_configs import build_random_nemo

    path = tmp_path_factory.mktemp("nemo") / "quartznet_tiny.nemo"
    return str(build_random_nemo("quartznet_tiny", str(path), seed=1))


@pytest.fixture(scope="session")
def quartznet_15x5_torch_int8(tmp_path_factory):
    """NeMo's QuartzNet 15x5 config (random weights, non-default BN) through FAST_PIPELINE to a torch-int8
    folder, once per session: (QuantizeResult, folder path). Building and calibrating it takes about 30 s."""
    pytest.importorskip("nemo")
    from qpipe.api import quantize
    from qpipe.frontends.nemo_configs import build_random_nemo

    tmp = tmp_path_factory.mktemp("qn15x5")
    src = build_random_nemo("quartznet_15x5", str(tmp / "m.nemo"))
    out = str(tmp / "ti8")
    return quantize(src, FAST_PIPELINE, output=out, target="torch-int8", progress=False), out


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny-tensor kernel tests: intra-op threads only add synchronization (badly so on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
