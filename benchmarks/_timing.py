"""Timing shared by the benchmarks."""

from __future__ import annotations

import time


def best_time(fn, repeat: int):
    """(the shortest of ``repeat`` wall times of ``fn()``, its last result)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result
