"""Timing shared by the benchmark scripts: interleaved repeats and their medians.

On a shared, noisy machine the variants of one table take turns (every round runs each once, in rotating
order), so that load changes hit them alike; the median of each variant's samples is reported.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable


def interleaved_medians(runs: dict[str, Callable[[], float]], repeats: int, warmup: int) -> dict[str, float]:
    """Median time of each run over ``repeats`` rounds; every round runs every variant once, in rotating order."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        order = names[round_ % len(names):] + names[: round_ % len(names)]
        for name in order:
            times[name].append(runs[name]())
    return {name: statistics.median(values) for name, values in times.items()}
