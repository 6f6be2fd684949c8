"""Summaries and budget verdicts for bench/report.py: pure functions, no measurement.

A figure is a list of per-round (or per-sample) values. Its summary is the median, quartiles,
min..max and a bootstrap 95 % confidence interval of the median (or of another statistic, e.g.
p99): resample the values with replacement, take the statistic of each resample, keep the
2.5th..97.5th percentiles of those. The generator is seeded, so one report.json renders the same
every time.

A budget "value <= limit" is *met* when the whole interval is at or below the limit, *not met*
when the whole interval is above it, and otherwise *not shown beyond noise*: the rounds cannot
tell the figure from the limit (more rounds, or a steadier workload, would).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

MET, NOT_MET, NOISE = "met", "not met", "not shown beyond noise"
BOUND_ABOVE = "not shown by the bound"  # an upper bound over the limit says nothing of the figure itself
RESAMPLES = 2000


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("no values")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


STATS = ("median", "p99", "max")


def statistic(values: Sequence[float], stat: str) -> float:
    if stat == "median":
        return statistics.median(values)
    if stat == "p99":
        return percentile(values, 99)
    if stat == "max":
        return max(values)
    raise ValueError(f"unknown statistic {stat!r}: one of {STATS}")


def bootstrap_ci(
    values: Sequence[float], stat: str = "median", level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` (median, p99, max) over ``values``."""
    if not values:
        raise ValueError("no values")
    statistic(values, stat)  # a clear error for an unknown statistic
    if len(values) == 1:
        return float(values[0]), float(values[0])
    arr = np.asarray(values, dtype=float)
    samples = arr[np.random.default_rng(seed).integers(0, len(arr), size=(resamples, len(arr)))]
    if stat == "median":
        stats = np.median(samples, axis=1)
    elif stat == "p99":
        stats = np.percentile(samples, 99, axis=1)
    else:
        stats = samples.max(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return float(lo), float(hi)


def summarize(values: Sequence[float], stat: str = "median") -> dict[str, Any]:
    """The chosen statistic (median, p99 or max) with its bootstrap CI; median, quartiles, min, max, n."""
    if not values:
        raise ValueError("no values")
    lo, hi = bootstrap_ci(values, stat)
    return {
        "stat": stat,
        "value": statistic(values, stat),
        "median": statistics.median(values),
        "q1": percentile(values, 25),
        "q3": percentile(values, 75),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "ci95": [lo, hi],
    }


def verdict(summary: dict[str, Any], limit: float, upper_bound: bool = False) -> str:
    """met / not met / not shown beyond noise, for "figure <= limit". ``upper_bound``: the values
    bound the figure from above (it is at most they), so they can show it within the limit, never
    beyond it."""
    lo, hi = summary["ci95"]
    if hi <= limit:
        return MET
    if upper_bound:
        return BOUND_ABOVE
    if lo > limit:
        return NOT_MET
    return NOISE
