#!/usr/bin/env python
"""Each integer kernel's error against float over its whole input range.

For every case: the kernel's exact integer output over every integer input of
its width (int8: -127..127; int16 where it says so), converted to real units,
against the float function of the real input (float64). Errors are reported
in *output units* (steps of the output scale): max and mean absolute error.
0.5 is the floor of any rounded output.

    .venv/bin/python tools/bench/kernel_error.py            # the table (markdown)
    .venv/bin/python tools/bench/kernel_error.py --only softmax

Adding a kernel (LayerNorm, matmul, ...): write a function that returns
``(integer output as a tensor, float reference in real units, output scale)``
and decorate it with ``@case(name, in_bits, in_scale, note)``. Each case runs
its kernel on every input of its range (or, for reductions, on rows built
from every value of the range plus random rows) and nothing else.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import qpipe.ir.ops  # noqa: E402,F401  (registers torch.ops.qpipe.*)
from qpipe.ir.dyadic import dyadic  # noqa: E402
from qpipe.ir.ops.gelu import gelu_input_ratio, gelu_product_scale  # noqa: E402
from qpipe.ir.ops.iexp import exp_input_ratio, exp_m_bits  # noqa: E402
from qpipe.ir.ops.sigmoid import gate_product_scale  # noqa: E402
from qpipe.ir.ops.softmax import unit_scale  # noqa: E402

Q = torch.ops.qpipe
F64 = torch.float64


@dataclass
class Case:
    name: str
    in_bits: int
    in_scale: float
    note: str
    run: Callable[[], tuple[torch.Tensor, torch.Tensor, float]]


CASES: list[Case] = []


def case(name: str, in_bits: int, in_scale: float, note: str = ""):
    def deco(fn):
        CASES.append(Case(name, in_bits, in_scale, note, fn))
        return fn

    return deco


def full_range(bits: int) -> torch.Tensor:
    hi = (1 << (bits - 1)) - 1
    return torch.arange(-hi, hi + 1, dtype=torch.int64)


def int_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits <= 8 else torch.int16


def rows_of_range(bits: int, length: int, extra: int = 2000, seed: int = 0) -> torch.Tensor:
    """Rows of ``length`` values: every value of the range at least once (shuffled), plus random rows."""
    values = full_range(bits)
    gen = torch.Generator().manual_seed(seed)
    reps = math.ceil(values.numel() / length) * length
    cover = values[torch.randperm(values.numel(), generator=gen)].repeat(math.ceil(reps / values.numel()))[:reps]
    rand = torch.randint(int(values[0]), int(values[-1]) + 1, (extra, length), generator=gen)
    return torch.cat([cover.reshape(-1, length), rand]).to(int_dtype(bits))


def observed_scale(ref: torch.Tensor, bits: int = 8) -> float:
    """What a min-max observer of the float output would choose."""
    return float(ref.abs().max()) / ((1 << (bits - 1)) - 1)


def requant_pair(ratio: float, product_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, s = dyadic(ratio, m_bits=max(2, min(31, 62 - product_bits - 1)))
    return torch.tensor(m, dtype=torch.int64), torch.tensor(s, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------- cases

for _S in (0.02, 0.1):

    @case("exp_int", 8, _S, "exp(x), x <= 0; output Q20")
    def _exp(S=_S):
        x = -full_range(8).abs().unique()
        m, s = dyadic(exp_input_ratio(S), m_bits=exp_m_bits(8))
        out = Q.exp_int(x.to(torch.int8), m, s, 32)
        return out, torch.exp(x.to(F64) * S), 2.0**-20

    for _ob in (8, 16):

        @case(f"softmax_int (out {_ob}-bit)", 8, _S, "rows of 16 over the range")
        def _softmax(S=_S, ob=_ob):
            x = rows_of_range(8, 16)
            m, s = dyadic(exp_input_ratio(S), m_bits=exp_m_bits(8))
            out = Q.softmax_int(x, -1, m, s, ob)
            return out, torch.softmax(x.to(F64) * S, dim=-1), unit_scale(ob)

        @case(f"sigmoid_int (out {_ob}-bit)", 8, _S)
        def _sigmoid(S=_S, ob=_ob):
            x = full_range(8)
            m, s = dyadic(exp_input_ratio(S), m_bits=exp_m_bits(8))
            return Q.sigmoid_int(x.to(torch.int8), m, s, ob), torch.sigmoid(x.to(F64) * S), unit_scale(ob)

    @case("silu_int", 8, _S, "output at the min-max scale of silu over the range")
    def _silu(S=_S):
        x = full_range(8)
        ref = torch.nn.functional.silu(x.to(F64) * S)
        out_scale = observed_scale(ref)
        m_e, s_e = dyadic(exp_input_ratio(S), m_bits=exp_m_bits(8))
        m, s = requant_pair(gate_product_scale(S) / out_scale, 8 + 16)
        return Q.silu_int(x.to(torch.int8), m_e, s_e, m, s, -127, 127, 8), ref, out_scale

    @case("glu_int", 8, _S, "every (a, b) pair of the range")
    def _glu(S=_S):
        v = full_range(8)
        a, b = torch.meshgrid(v, v, indexing="ij")
        x = torch.cat([a.reshape(-1, 1), b.reshape(-1, 1)], dim=1)
        ref = torch.nn.functional.glu(x.to(F64) * S, dim=1)
        out_scale = observed_scale(ref)
        m_e, s_e = dyadic(exp_input_ratio(S), m_bits=exp_m_bits(8))
        m, s = requant_pair(gate_product_scale(S) / out_scale, 8 + 16)
        return Q.glu_int(x.to(torch.int8), 1, m_e, s_e, m, s, -127, 127, 8), ref, out_scale

    @case("gelu_int (I-BERT erf)", 8, _S)
    def _gelu(S=_S):
        x = full_range(8)
        ref = torch.nn.functional.gelu(x.to(F64) * S)
        out_scale = observed_scale(ref)
        m_u, s_u = dyadic(gelu_input_ratio(S), m_bits=31)
        m, s = requant_pair(gelu_product_scale(S) / out_scale, 8 + 18)
        return Q.gelu_int(x.to(torch.int8), m_u, s_u, m, s, -127, 127, 8), ref, out_scale


@case("softmax_int (out 16-bit)", 16, 0.0005, "int16 scores: rows of 16 over the range")
def _softmax16():
    x = rows_of_range(16, 16, extra=500)
    m, s = dyadic(exp_input_ratio(0.0005), m_bits=exp_m_bits(16))
    return Q.softmax_int(x, -1, m, s, 16), torch.softmax(x.to(F64) * 0.0005, dim=-1), unit_scale(16)


@case("sigmoid_int (out 16-bit)", 16, 0.0005, "every int16 input")
def _sigmoid16():
    x = full_range(16)
    m, s = dyadic(exp_input_ratio(0.0005), m_bits=exp_m_bits(16))
    return Q.sigmoid_int(x.to(torch.int16), m, s, 16), torch.sigmoid(x.to(F64) * 0.0005), unit_scale(16)


@case("mul_requant (int8 x int16 gate)", 8, 0.05, "every int8 x, gates 1/32767 over [0, 1] in 257 steps")
def _mul():
    a = full_range(8)
    g = torch.linspace(0, 32767, 257).round().to(torch.int64)
    A, G = torch.meshgrid(a, g, indexing="ij")
    ref = (A.to(F64) * 0.05) * (G.to(F64) / 32767)
    out_scale = observed_scale(ref)
    m, s = requant_pair(0.05 * unit_scale(16) / out_scale, 8 + 16)
    return Q.mul_requant(A.to(torch.int8), G.to(torch.int16), m, s, -127, 127, 8), ref, out_scale


@case("mean_int (over T=100)", 8, 0.05, "rows of 100 over the range")
def _mean():
    x = rows_of_range(8, 100)
    ref = x.to(F64).mean(dim=-1, keepdim=True) * 0.05
    out_scale = observed_scale(ref)
    m, s = requant_pair(0.05 / out_scale, 8 + 16)
    count = torch.full((x.shape[0], 1), 100, dtype=torch.int64)
    return Q.mean_int(x, count, [-1], True, m, s, -127, 127, 8), ref, out_scale


# ------------------------------------------------------------------ the Conformer's kernels (LayerNorm, matmul, scale)


def _ln_case(d: int, S: float, affine: bool):
    from qpipe.ir.ops.layernorm import LN_FRAC_BITS, layer_norm_scale
    from qpipe.passes.lower.layernorm import affine_constants, sqrt_shift_for

    x = rows_of_range(8, d, extra=3000)
    eps = 1e-5
    eps_int = int(math.floor(eps * d**3 / S**2 + 0.5))
    core = Q.layer_norm_core(x, eps_int, LN_FRAC_BITS, sqrt_shift_for(8, d, eps_int), 16)
    core_scale = layer_norm_scale(d)
    if not affine:
        return core, torch.nn.functional.layer_norm(x.to(F64) * S, (d,), eps=eps), core_scale
    gen = torch.Generator().manual_seed(1)
    gamma = torch.rand(d, generator=gen, dtype=F64) * 1.5 - 0.25  # some negative, some near zero
    beta = torch.randn(d, generator=gen, dtype=F64) * 0.3
    ref = torch.nn.functional.layer_norm(x.to(F64) * S, (d,), gamma, beta, eps=eps)
    out_scale = observed_scale(ref)
    w, _, bq, m, sh = affine_constants(gamma, beta, core_scale, out_scale)
    return Q.scale_rq(core, w, bq, m, sh, -1, -127, 127, 8), ref, out_scale


for _d in (96, 256):

    @case(f"layer_norm_core (D={_d}, out int16)", 8, 0.05, "rows over the range; vs float LayerNorm (no affine)")
    def _ln_core(d=_d):
        return _ln_case(d, 0.05, False)

    @case(f"LayerNorm + affine scale_rq (D={_d}, out int8)", 8, 0.05, "random gamma in [-0.25, 1.25], beta")
    def _ln_affine(d=_d):
        return _ln_case(d, 0.05, True)


@case("matmul_rq (int8 x int8, K=64)", 8, 0.05, "Q K^T-like: rows over the range x random int8 columns")
def _matmul():
    a = rows_of_range(8, 64, extra=500).to(torch.int64)
    gen = torch.Generator().manual_seed(2)
    b = torch.randint(-127, 128, (64, 48), generator=gen)
    ref = (a.to(F64) * 0.05) @ (b.to(F64) * 0.03)
    out_scale = observed_scale(ref)
    m, s = dyadic(0.05 * 0.03 / out_scale)
    out = Q.matmul_rq(a.to(torch.int8), b.to(torch.int8), torch.tensor([m]), torch.tensor([s]), -127, 127, 8)
    return out, ref, out_scale


@case("scale_rq (x / sqrt(24))", 8, 0.05, "every int8 input; output scale 1.37x the min-max one (no exact ratio)")
def _scale():
    x = full_range(8)
    c = 1 / math.sqrt(24)
    ref = x.to(F64) * 0.05 * c
    out_scale = observed_scale(ref) * 1.37
    m, s = dyadic(0.05 * c / out_scale)
    out = Q.scale_rq(x.to(torch.int8), torch.tensor([1], dtype=torch.int8), None, torch.tensor([m]),
                     torch.tensor([s]), 0, -127, 127, 8)
    return out, ref, out_scale


# ---------------------------------------------------------------------------------------------- table


def measure(c: Case) -> tuple[float, float]:
    out, ref, out_scale = c.run()
    err = (out.to(F64) * out_scale - ref.to(F64)).abs() / out_scale
    return float(err.max()), float(err.mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="cases whose name contains this")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| kernel | input | input scale | max abs err (out units) | mean abs err (out units) | note |")
    print("|---|---|---|---|---|---|")
    for c in CASES:
        if args.only and args.only not in c.name:
            continue
        mx, mean = measure(c)
        print(f"| {c.name} | int{c.in_bits} | {c.in_scale:g} | {mx:.3f} | {mean:.3f} | {c.note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
