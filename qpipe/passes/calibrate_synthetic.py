"""calibrate-synthetic: Q-ASR's zero-shot calibration from BatchNorm statistics."""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Interpreter, Node

from qpipe.ir.errors import QpipeError
from qpipe.ir.meta import BN_TARGET
from qpipe.ir.passes import PassContext, PassResult, register
from qpipe.ir.stages import Stage
from qpipe.passes.calibration import calibrate_from_batches, input_shape


class _Capture(Interpreter):
    """Runs the graph and keeps the values of the BN-target nodes (differentiably)."""

    def __init__(self, gm: GraphModule, targets: set[Node]):
        super().__init__(gm)
        self.targets = targets
        self.captured: dict[Node, torch.Tensor] = {}

    def run_node(self, n: Node):
        value = super().run_node(n)
        if n in self.targets:
            self.captured[n] = value
        return value


def gaussian_kl(mu_t: torch.Tensor, std_t: torch.Tensor, mu_b: torch.Tensor, std_b: torch.Tensor) -> torch.Tensor:
    """KL( N(mu_t, std_t) || N(mu_b, std_b) ) per channel."""
    std_b = std_b.clamp_min(1e-5)
    std_t = std_t.clamp_min(1e-5)
    return torch.log(std_b / std_t) + (std_t**2 + (mu_t - mu_b) ** 2) / (2 * std_b**2) - 0.5


def per_feature_normalize(x: torch.Tensor, time_dim: int = -1) -> torch.Tensor:
    """What NeMo's ``normalize: per_feature`` does to every utterance: each feature row zero mean, unit std."""
    mean = x.mean(dim=time_dim, keepdim=True)
    std = x.std(dim=time_dim, keepdim=True)  # NeMo uses the unbiased std, plus 1e-5
    return (x - mean) / (std + 1e-5)


def input_normalization(option: str, preprocessor: dict | None) -> str:
    """``auto`` follows the model's preprocessor config; else the option as given."""
    if option not in ("auto", "per_feature", "none"):
        raise QpipeError(f"calibrate-synthetic: input_norm must be auto, per_feature or none, got {option!r}")
    if option != "auto":
        return option
    return "per_feature" if (preprocessor or {}).get("normalize") == "per_feature" else "none"


def distill(gm: GraphModule, shape: tuple[int, ...], steps: int, lr: float, init: float, seed: int, progress: bool,
            channel_dim: int = 1, input_norm: str = "none") -> tuple[torch.Tensor, float, float]:
    """Optimize an input batch so each folded layer's batch statistics match its BN target.

    With ``input_norm="per_feature"`` the optimized variable goes through the same
    per-feature normalization as every real utterance, so the synthetic input can only
    move within the set of inputs the model can ever see.
    """
    targets = {n: n.meta[BN_TARGET] for n in gm.graph.nodes if BN_TARGET in n.meta}
    if not targets:
        raise QpipeError("the model has no BatchNorm statistics to match (no folded BN); use calibrate-data instead")
    gen = torch.Generator().manual_seed(seed)
    z = (torch.rand(shape, generator=gen) * 2 - 1) * init
    z.requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)

    def make_input() -> torch.Tensor:
        return per_feature_normalize(z) if input_norm == "per_feature" else z

    for p in gm.parameters():
        p.requires_grad_(False)

    def loss_of(captured: dict) -> torch.Tensor:
        total = z.new_zeros(())
        for node, value in captured.items():
            dims = [d for d in range(value.dim()) if d != channel_dim]
            mu_b = value.mean(dim=dims)
            std_b = value.std(dim=dims, unbiased=False)
            tgt = targets[node]
            total = total + gaussian_kl(tgt["mean"], tgt["std"], mu_b, std_b).mean()
        return total

    first = last = float("nan")
    bar = None
    if progress and steps > 0:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="calibrate-synthetic", unit="step", leave=False, dynamic_ncols=True, mininterval=1.0)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        cap = _Capture(gm, set(targets))
        cap.run(make_input())
        loss = loss_of(cap.captured)
        loss.backward()
        opt.step()
        last = float(loss.detach())
        if step == 0:
            first = last
        if bar is not None:
            bar.update(1)
            bar.set_postfix(kl=f"{last:.3g}")
    if bar is not None:
        bar.close()
    with torch.no_grad():
        return make_input().detach(), first, last


@register(
    "calibrate-synthetic",
    needs=Stage.OBSERVED,
    leaves=Stage.CALIBRATED,
    options={"batch": 4, "batches": 1, "steps": 50, "length": 128, "lr": 0.1, "init": 0.3, "seed": 0, "input_norm": "auto"},
)
def calibrate_synthetic(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Calibrate on synthetic inputs distilled to match the model's BatchNorm statistics (no data).

    Inputs start uniform in [-init, init], shape (batch, features, length); Adam
    on the input minimizes the sum over folded BN layers of the KL divergence
    between N(beta, |gamma|) and the layer's batch statistics. The distilled
    batches then fill the observers. ``input_norm=auto`` keeps the inputs normalized
    the way the model's preprocessor normalizes real features (NeMo's per_feature:
    every feature row of every utterance has mean 0 and std 1), a fact of the front
    end, not of any data.
    """
    o = ctx.options
    if o["batch"] < 1 or o["batches"] < 1 or o["steps"] < 0 or o["length"] < 2 or o["lr"] <= 0:
        raise QpipeError("calibrate-synthetic: batch, batches >= 1, steps >= 0, length >= 2, lr > 0")
    shape = input_shape(gm, ctx.state, int(o["batch"]), int(o["length"]))
    norm = input_normalization(str(o["input_norm"]), ctx.state.preprocessor)
    data, firsts, lasts = [], [], []
    for b in range(int(o["batches"])):
        x, first, last = distill(gm, shape, int(o["steps"]), float(o["lr"]), float(o["init"]), int(o["seed"]) + b, ctx.progress, input_norm=norm)
        data.append(x)
        firsts.append(first)
        lasts.append(last)
    stats = calibrate_from_batches(gm, data, "synthetic")
    stats.update({"kl_first": round(sum(firsts) / len(firsts), 4), "kl_last": round(sum(lasts) / len(lasts), 4), "input_norm": norm})
    ctx.state.calibration_inputs = data
    return PassResult(gm, True, stats)
