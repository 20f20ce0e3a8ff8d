"""Timing helpers shared by the kernel benchmarks (imported as ``_timing``: a benchmark run
as ``python bench/x.py`` has ``bench/`` on its path)."""

from __future__ import annotations

import statistics
import time


def time_ms(fn, min_s: float = 0.02) -> float:
    """ms per call: repeat ``fn`` until ``min_s`` has passed."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return 1e3 * dt / n


def round_robin_medians(fns: dict, reps: int) -> dict:
    """``{name: median ms}`` over ``reps`` rounds that time every function once per round."""
    res = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            res[name].append(time_ms(fn))
    return {name: statistics.median(v) for name, v in res.items()}
