"""The in-process timing the kernel benchmarks share: one variant's median call, and rotated rounds.

In-process microseconds, for comparing variants within one run; whole-model ratios come from
``inference.py`` (a process per candidate).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable


def median_us(fn: Callable[[], object], calls: int, warmup: int = 5) -> float:
    """The median of ``calls`` timed calls of ``fn`` after ``warmup`` untimed ones, in microseconds."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def rotated_medians(cases: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, float]:
    """Each case's median over ``rounds`` of its per-round :func:`median_us`; the order rotates every round."""
    names = list(cases)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            per_round[n].append(median_us(cases[n], calls))
    return {n: statistics.median(v) for n, v in per_round.items()}
