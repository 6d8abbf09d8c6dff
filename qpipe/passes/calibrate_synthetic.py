"""calibrate-synthetic: zero-shot calibration from what the model itself stores.

Q-ASR's method (``targets=bn``, the default): optimize synthetic inputs so each
folded BatchNorm layer's batch statistics match its stored running statistics.
BatchNorm reaches only the layers it follows: a Conformer's attention and
feed-forward blocks have LayerNorm instead, and a model whose BatchNorm was
folded at export has no statistics at all (DGH, arXiv 2410.22110, names the gap).
The other targets supervise what BatchNorm does not reach:

* ``ln``: every LayerNorm's affine parameters as the per-channel statistics of its
  output, N(beta, |gamma|) over (batch, time): the normalized value is zero mean,
  unit variance per token, and the affine is what the model learned to expect of
  each channel (the analogue of BN's beta, gamma; no running statistics needed).
* ``ctc``: the model's own output as the label (GDFQ's class-conditional idea for
  CTC): random token sequences, and the CTC loss of the model's output against them,
  so the input must drive every layer into the regime that emits speech-like,
  confident frames.  Needs no BatchNorm and no vocabulary (blank: the last class).
* ``tv``: a speech prior on the input: mean squared frame-to-frame difference
  (log-mel frames 10 ms apart are smooth in time; uniform noise is not).

``targets`` joins them with ``+`` (``bn+ln``, ``ctc+tv``); ``auto`` takes the
statistics the model has (bn, ln) and falls back to ``ctc+tv`` when it has none.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Interpreter, Node

from qpipe.ir.errors import QpipeError
from qpipe.ir.graph_utils import fetch_attr
from qpipe.ir.meta import BN_TARGET
from qpipe.ir.passes import Opt, PassContext, PassResult, register
from qpipe.ir.stages import Stage
from qpipe.passes.calibration import calibrate_from_batches, input_shape

TARGET_KINDS = ("bn", "ln", "ctc", "tv")
_LAYER_NORM = (torch.ops.aten.layer_norm.default,)
_NO_STATISTICS = (
    "the model has no BatchNorm statistics to match (no folded BN: folded at export?); "
    "use calibrate-synthetic{targets=ctc+tv} (needs no BN), calibrate-tts or calibrate-data"
)


class _Capture(Interpreter):
    """Runs the graph and keeps the values of the target nodes (differentiably)."""

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


def layer_norm_targets(gm: GraphModule) -> dict[Node, dict[str, Any]]:
    """LayerNorm output per channel (last axis): mean beta, std |gamma| (0 and 1 without affine)."""
    out: dict[Node, dict[str, Any]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in _LAYER_NORM:
            continue
        shape = n.args[1]
        if len(shape) != 1:
            continue  # normalized over several axes: no per-channel target
        c = int(shape[0])
        w = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
        b = n.args[3] if len(n.args) > 3 else n.kwargs.get("bias")
        gamma = fetch_attr(gm, w.target).detach().float() if isinstance(w, Node) and w.op == "get_attr" else torch.ones(c)
        beta = fetch_attr(gm, b.target).detach().float() if isinstance(b, Node) and b.op == "get_attr" else torch.zeros(c)
        out[n] = {"mean": beta.clone(), "std": gamma.abs().clone(), "dim": -1}
    return out


def parse_targets(text: str, gm: GraphModule) -> tuple[str, ...]:
    """``bn+ln+ctc+tv`` -> the kinds, in that canonical order; ``auto`` -> what the model supports."""
    text = text.strip().lower()
    if text == "auto":
        kinds = [k for k, has in (("bn", _has_bn(gm)), ("ln", bool(layer_norm_targets(gm)))) if has]
        return tuple(kinds) if kinds else ("ctc", "tv")
    parts = [p.strip() for p in text.split("+") if p.strip()]
    bad = [p for p in parts if p not in TARGET_KINDS]
    if bad or not parts:
        raise QpipeError(f"calibrate-synthetic: targets must be auto or {'+'.join(TARGET_KINDS)} joined by '+', got {text!r}")
    return tuple(k for k in TARGET_KINDS if k in parts)


def _has_bn(gm: GraphModule) -> bool:
    return any(BN_TARGET in n.meta for n in gm.graph.nodes)


def statistic_targets(gm: GraphModule, kinds: tuple[str, ...]) -> dict[Node, dict[str, Any]]:
    """Per-channel (mean, std) targets of the chosen kinds, in graph order; ``dim``: the channel axis."""
    ln = layer_norm_targets(gm) if "ln" in kinds else {}
    out: dict[Node, dict[str, Any]] = {}
    for n in gm.graph.nodes:
        if "bn" in kinds and BN_TARGET in n.meta:
            out[n] = {**n.meta[BN_TARGET], "dim": 1}
        elif n in ln:
            out[n] = ln[n]
    return out


def random_labels(frames: int, classes: int, batch: int, rate: float, gen: torch.Generator) -> torch.Tensor:
    """(batch, n) random non-blank token ids (blank = the last class) with no immediate repeat,
    n = rate * frames, so that a CTC path of ``frames`` frames always exists."""
    n = max(1, min(frames, int(round(rate * frames))))
    if classes < 2:
        raise QpipeError("calibrate-synthetic: targets=ctc needs an output with at least 2 classes (blank last)")
    first = torch.randint(0, classes - 1, (batch, 1), generator=gen)
    if classes == 2 or n == 1:
        return first.expand(batch, n).clone()
    steps = torch.randint(1, classes - 1, (batch, n - 1), generator=gen)
    return torch.cat([first, first + steps.cumsum(1)], dim=1) % (classes - 1)


def _first_tensor(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise QpipeError("calibrate-synthetic: targets=ctc needs a graph whose first output is a tensor")
    return out


def ctc_term(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CTC loss (per label token) of the (B, T', V) output against ``labels``; blank = V-1."""
    lp = torch.log_softmax(output.float(), dim=-1).transpose(0, 1)  # (T', B, V)
    frames, batch, classes = lp.shape
    input_lengths = torch.full((batch,), frames, dtype=torch.long)
    target_lengths = torch.full((batch,), labels.shape[1], dtype=torch.long)
    return torch.nn.functional.ctc_loss(lp, labels, input_lengths, target_lengths, blank=classes - 1,
                                        reduction="mean", zero_infinity=True)


def tv_term(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring frames (last axis)."""
    return (x[..., 1:] - x[..., :-1]).pow(2).mean()


def distill(gm: GraphModule, shape: tuple[int, ...], steps: int, lr: float, init: float, seed: int, progress: bool,
            channel_dim: int = 1, input_norm: str = "none", kinds: tuple[str, ...] = ("bn",),
            ctc_weight: float = 1.0, ctc_rate: float = 0.3, tv_weight: float = 0.1) -> tuple[torch.Tensor, float, float]:
    """Optimize an input batch so the chosen targets are met (see the module docstring).

    With ``input_norm="per_feature"`` the optimized variable goes through the same
    per-feature normalization as every real utterance, so the synthetic input can only
    move within the set of inputs the model can ever see.  ``kinds=("bn",)`` is Q-ASR's
    loss, unchanged bit for bit.
    """
    targets = statistic_targets(gm, kinds)
    if "bn" in kinds and not _has_bn(gm):
        raise QpipeError(_NO_STATISTICS)
    if not targets and not {"ctc", "tv"} & set(kinds):
        raise QpipeError(f"calibrate-synthetic: the model has nothing to match for targets={'+'.join(kinds)}")
    if kinds == ("tv",):
        raise QpipeError("calibrate-synthetic: targets=tv alone is only a prior on the input; add ctc, bn or ln")
    gen = torch.Generator().manual_seed(seed)
    z = (torch.rand(shape, generator=gen) * 2 - 1) * init
    z.requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    label_gen = torch.Generator().manual_seed(10007 * (seed + 1))  # apart from z's, so bn's start is unchanged
    labels: torch.Tensor | None = None

    def make_input() -> torch.Tensor:
        return per_feature_normalize(z) if input_norm == "per_feature" else z

    for p in gm.parameters():
        p.requires_grad_(False)

    def loss_of(captured: dict) -> torch.Tensor:
        total = z.new_zeros(())
        for node, value in captured.items():
            tgt = targets[node]
            dim = tgt.get("dim", channel_dim) % value.dim()
            dims = [d for d in range(value.dim()) if d != dim]
            mu_b = value.mean(dim=dims)
            std_b = value.std(dim=dims, unbiased=False)
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
        x = make_input()
        out = cap.run(x)
        loss = loss_of(cap.captured)
        if "ctc" in kinds:
            logits = _first_tensor(out)
            if labels is None:
                labels = random_labels(logits.shape[1], logits.shape[-1], logits.shape[0], ctc_rate, label_gen)
            loss = loss + ctc_weight * ctc_term(logits, labels)
        if "tv" in kinds:
            loss = loss + tv_weight * tv_term(x)
        loss.backward()
        opt.step()
        last = float(loss.detach())
        if step == 0:
            first = last
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{last:.3g}")
    if bar is not None:
        bar.close()
    with torch.no_grad():
        return make_input().detach(), first, last


@register(
    "calibrate-synthetic",
    needs=Stage.OBSERVED,
    leaves=Stage.CALIBRATED,
    options={
        "batch": Opt(4, lo=1),
        "batches": Opt(1, lo=1),
        "steps": Opt(50, lo=0),
        "length": Opt(128, lo=2),
        "lr": Opt(0.1, lo=0, lo_open=True),
        "init": Opt(0.3, lo=0, lo_open=True),
        "seed": Opt(0, lo=0, hi=2**32 - 1),
        "input_norm": Opt("auto", choices=("auto", "per_feature", "none")),
        "targets": "bn",  # checked by the pass (auto, or kinds joined by '+')
        "ctc_weight": Opt(1.0, lo=0),
        "ctc_rate": Opt(0.3, lo=0, hi=1, lo_open=True),
        "tv_weight": Opt(0.1, lo=0),
    },
)
def calibrate_synthetic(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Calibrate on synthetic inputs distilled to match the model's BatchNorm statistics (no data).

    Inputs start uniform in [-init, init], shape (batch, features, length); Adam
    on the input minimizes the sum over folded BN layers of the KL divergence
    between N(beta, |gamma|) and the layer's batch statistics. The distilled
    batches then fill the observers. ``input_norm=auto`` keeps the inputs normalized
    the way the model's preprocessor normalizes real features (NeMo's per_feature:
    every feature row of every utterance has mean 0 and std 1), a fact of the front
    end, not of any data. ``targets`` adds supervision BatchNorm does not give
    (``ln``: LayerNorm affine parameters; ``ctc``: random-label CTC on the output;
    ``tv``: a smoothness prior), or replaces it on models without BatchNorm
    (``targets=ctc+tv``, ``targets=auto``); see the module docstring.
    """
    o = ctx.options
    if o["batch"] < 1 or o["batches"] < 1 or o["steps"] < 0 or o["length"] < 2 or o["lr"] <= 0:
        raise QpipeError("calibrate-synthetic: batch, batches >= 1, steps >= 0, length >= 2, lr > 0")
    if o["ctc_weight"] < 0 or o["tv_weight"] < 0 or not 0 < o["ctc_rate"] <= 1:
        raise QpipeError("calibrate-synthetic: ctc_weight, tv_weight >= 0 and 0 < ctc_rate <= 1")
    kinds = parse_targets(str(o["targets"]), gm)
    shape = input_shape(gm, ctx.state, int(o["batch"]), int(o["length"]))
    norm = input_normalization(str(o["input_norm"]), ctx.state.preprocessor)
    data, firsts, lasts = [], [], []
    for b in range(int(o["batches"])):
        x, first, last = distill(gm, shape, int(o["steps"]), float(o["lr"]), float(o["init"]), int(o["seed"]) + b, ctx.progress,
                                 input_norm=norm, kinds=kinds, ctc_weight=float(o["ctc_weight"]),
                                 ctc_rate=float(o["ctc_rate"]), tv_weight=float(o["tv_weight"]))
        data.append(x)
        firsts.append(first)
        lasts.append(last)
    stats = calibrate_from_batches(gm, data, "synthetic" if kinds == ("bn",) else f"synthetic:{'+'.join(kinds)}")
    n_targets = statistic_targets(gm, kinds)
    stats.update({"kl_first": round(sum(firsts) / len(firsts), 4), "kl_last": round(sum(lasts) / len(lasts), 4), "input_norm": norm})
    if kinds != ("bn",):
        stats.update({"targets": "+".join(kinds), "stat_targets": len(n_targets)})
    ctx.state.calibration_inputs = data
    return PassResult(gm, True, stats)
