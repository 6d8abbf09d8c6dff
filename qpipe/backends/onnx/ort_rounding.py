"""ONNX Runtime's integer kernels, emulated bit for bit, to pick QDQ scales that reproduce qpipe's rounding.

ORT's CPU provider (MLAS, x86 with AVX2/FMA) requantizes

* ``QLinearConv`` / ``QGemm``: ``rne(fl32(fl32(acc) * M))`` with the float32
  multiplier ``M = fl32(fl32(X_scale * W_scale[c]) / Y_scale)``
  (``MlasRequantizeOutput``: int32 -> float, multiply, round to nearest even);
* ``QLinearAdd`` (uint8): ``rne(fma(a, r_ac, fma(b, r_bc, F)))`` on the raw
  codes, with ``r_ac = fl32(A_scale / C_scale)``, ``r_bc`` likewise and
  ``F = zc - (r_ac*za + r_bc*zb)`` (``MlasQLinearAddKernelAvx2Helper``).

qpipe's dyadic requantization is ``floor((acc*m + 2**(s-1)) / 2**s)``. The two
differ only on values within about 2**-24 of a rounding boundary. The scales in
the ONNX file are free within a few float32 ulps (each DequantizeLinear
has its own scale constant), so for every conv output channel and every add we
search the neighbouring float32 scales for the one whose ORT result equals
qpipe's on *every* reachable input near a boundary (convs: every accumulator
within the channel's bound that lies near a half-integer of the output grid;
adds: every pair of input codes, exhaustively). Where no neighbour is exact, the
one with the fewest differing inputs is taken and counted. (On the demo
QuartzNet 7640 of 7776 conv channels have an exact neighbour; the other 136
keep 231 large accumulators within ~4e-6 of a boundary that round differently:
a float32 product cannot land on both sides of them. Searching 1024 ulps
instead of 24 found no more.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

F32 = np.float32


@dataclass
class MatchStats:
    """How well the chosen scales reproduce qpipe's rounding in ORT's kernels."""

    conv_channels: int = 0
    conv_channels_exact: int = 0
    conv_boundary_mismatches: int = 0  # accumulators (summed over channels) that still round differently
    adds: int = 0
    adds_exact: int = 0
    add_mismatches: int = 0  # input pairs (summed over adds) that still round differently

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


def neighbours(x: np.ndarray, ulps: int) -> np.ndarray:
    """The float32 values within ``ulps`` steps of each positive float32 in ``x``: shape (len(x), 2*ulps+1)."""
    bits = np.asarray(x, dtype=F32).reshape(-1).view(np.int32).astype(np.int64)
    steps = np.arange(-ulps, ulps + 1, dtype=np.int64)
    return (bits[:, None] + steps[None, :]).astype(np.int32).view(F32)


def qpipe_round(v: np.ndarray, s: int) -> np.ndarray:
    """``floor((v + 2**(s-1)) / 2**s)`` on int64 (v already multiplied by m)."""
    if s <= 0:
        return v << -s if s < 0 else v
    return (v + (np.int64(1) << np.int64(s - 1))) >> np.int64(s)


def ort_requant(acc: np.ndarray, multiplier: np.ndarray) -> np.ndarray:
    """MLAS: ``rne(fl32(fl32(acc) * M))`` for every multiplier (rows) and accumulator (columns)."""
    prod = acc.astype(F32)[None, :] * np.asarray(multiplier, dtype=F32).reshape(-1, 1)
    return np.rint(prod).astype(np.int64)


def conv_multiplier(sx: float, sw: np.ndarray, sy: float) -> np.ndarray:
    """ORT's QLinearConv multiplier ``fl32(fl32(X_scale * W_scale) / Y_scale)``."""
    return (F32(sx) * np.asarray(sw, dtype=F32)) / F32(sy)


def _boundary_accumulators(m: int, s: int, lo: int, hi: int, bound: int, width: float) -> np.ndarray:
    """Accumulators within ``bound`` whose exact value ``acc*m/2**s`` is within ``width`` of a
    rounding boundary ``k + 1/2`` with both ``k`` and ``k + 1`` inside ``[lo, hi]``."""
    r = m / 2.0**s
    if r <= 0:
        return np.zeros(0, dtype=np.int64)
    ties = np.arange(lo, hi, dtype=np.float64) + 0.5
    centers = np.floor(ties / r).astype(np.int64)
    w = int(np.ceil(width / r)) + 1
    accs = (centers[:, None] + np.arange(-w, w + 2, dtype=np.int64)[None, :]).reshape(-1)
    accs = np.unique(accs[np.abs(accs) <= min(bound, (1 << 24) - 1)])
    return accs


def match_conv_scales(
    sx: float, sy: float, m: np.ndarray, s: np.ndarray, lo: int, hi: int, acc_bound: np.ndarray,
    start: np.ndarray, ulps: int = 24, stats: MatchStats | None = None,
) -> np.ndarray:
    """Per output channel, the float32 weight scale (near ``start``) whose ORT requantization
    reproduces qpipe's ``(m, s)`` on every boundary accumulator; returns float32 scales."""
    out = np.asarray(start, dtype=F32).copy()
    cands_all = neighbours(out, ulps)
    # every accumulator a multiplier within `ulps` can round differently lies this close to a boundary
    width = (max(abs(lo), abs(hi)) + 1) * (ulps + 2) * 2.0**-22
    for c in range(len(out)):
        mc, sc = int(m[c]), int(s[c])
        cands = cands_all[c]
        mult = conv_multiplier(sx, cands, sy)
        accs = _boundary_accumulators(mc, sc, lo, hi, int(acc_bound[c]), width)
        if accs.size == 0:
            continue
        ref = np.clip(qpipe_round(accs * np.int64(mc), sc), lo, hi)
        got = np.clip(ort_requant(accs, mult), lo, hi)
        bad = (got != ref[None, :]).sum(axis=1)
        distance = np.abs(mult.astype(np.float64) - mc / 2.0**sc)
        best = int(np.lexsort((distance, bad))[0])
        out[c] = cands[best]
        if stats is not None:
            stats.conv_channels += 1
            stats.conv_channels_exact += int(bad[best] == 0)
            stats.conv_boundary_mismatches += int(bad[best])
    return out


def ort_qladd_u8(a: np.ndarray, b: np.ndarray, r_ac: np.float32, r_bc: np.float32, za: int, zb: int, zc: int) -> np.ndarray:
    """MLAS's AVX2 QLinearAdd on uint8 codes ``a``, ``b`` (before the final saturation), as int64.

    ``F = fl32(zc - fl32(r_ac*za + r_bc*zb))``, then per element ``fma(b, r_bc, F)``
    and ``fma(a, r_ac, .)``, each one rounding to float32 (exact in float64 first), then
    round to nearest even.
    """
    r_ac, r_bc = F32(r_ac), F32(r_bc)
    fixed = F32(F32(zc) - F32(np.float64(r_ac) * za + np.float64(r_bc) * zb))
    v = (b.astype(np.float64) * np.float64(r_bc) + np.float64(fixed)).astype(F32)
    v = (a.astype(np.float64) * np.float64(r_ac) + v.astype(np.float64)).astype(F32)
    return np.rint(v).astype(np.int64)


def match_add_scales(
    sa: float, sb: float, sc: float, ma: int, mb: int, s: int, a_range: tuple[int, int], b_range: tuple[int, int],
    lo: int, hi: int, zp: int = 128, ulps: int = 12, stats: MatchStats | None = None,
    zb: int | None = None, zc: int | None = None,
) -> tuple[np.float32, np.float32]:
    """float32 scales for the add's two DequantizeLinear inputs (the output's kept) with which ORT's
    QLinearAdd equals qpipe's ``(a*ma + b*mb + 2**(s-1)) >> s`` on every pair of input codes.

    ``zp``: the first input's zero point, ``zb`` / ``zc`` the second input's and the output's
    (default: ``zp``); [lo, hi]: the output range compared, in qpipe units."""
    za = zp
    zb = za if zb is None else zb
    zc = za if zc is None else zc
    a = np.arange(a_range[0], a_range[1] + 1, dtype=np.int64)
    b = np.arange(b_range[0], b_range[1] + 1, dtype=np.int64)
    A, B = (g.reshape(-1) for g in np.meshgrid(a, b, indexing="ij"))
    ref = np.clip(qpipe_round(A * ma + B * mb, s), lo, hi)
    sc32 = F32(sc)
    cand_a = neighbours(np.array([ma / 2.0**s * float(sc32)]), ulps)[0]
    cand_b = neighbours(np.array([mb / 2.0**s * float(sc32)]), ulps)[0]
    ra = {}
    for x in cand_a:  # distinct ratios only
        ra.setdefault(float(F32(x) / sc32), x)
    rb = {}
    for x in cand_b:
        rb.setdefault(float(F32(x) / sc32), x)
    target_a, target_b = ma / 2.0**s, mb / 2.0**s
    best = None
    order_a = sorted(ra, key=lambda r: abs(r - target_a))
    order_b = sorted(rb, key=lambda r: abs(r - target_b))
    for r_a in order_a:
        for r_b in order_b:
            got = ort_qladd_u8(A + za, B + zb, F32(r_a), F32(r_b), za, zb, zc)
            got = np.clip(np.clip(got, 0, 255) - zc, lo, hi)
            bad = int((got != ref).sum())
            key = (bad, abs(r_a - target_a) / target_a + abs(r_b - target_b) / target_b)
            if best is None or key < best[0]:
                best = (key, ra[r_a], rb[r_b])
            if bad == 0:
                break
        if best is not None and best[0][0] == 0:
            break
    (bad, _), sa32, sb32 = best
    if stats is not None:
        stats.adds += 1
        stats.adds_exact += int(bad == 0)
        stats.add_mismatches += bad
    return F32(sa32), F32(sb32)
