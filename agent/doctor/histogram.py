"""Log2 latency histograms drawn for a terminal, as BCC's runqlat and klockstat draw them: one row
per power-of-two bucket in microseconds (``lo -> hi : count |****|``), empty rows at both ends
left out, the bar scaled to the fullest bucket.

Input: the window's buckets (``Histogram``: upper bound in seconds, count), which are the kernel's
log2 slots one to one (``metrics/histogram.py``: slot s counts waits in (2^(s-1), 2^s] us).
"""

from __future__ import annotations

import math

from agent.doctor.findings import Histogram

BAR_MAX = 40  # BCC's width
COUNT_W = 8
LABEL = "{lo:>9} -> {hi:<9} : {count:<8} |"
FIXED = len(LABEL.format(lo="", hi="", count="")) + 1  # everything but the bar, "|" at the end


def _us(bound_s: float) -> str:
    return "inf" if math.isinf(bound_s) else str(round(bound_s * 1e6))


def rows(hist: Histogram, width: int) -> list[str]:
    """The histogram's lines, each at most ``width`` columns: the bar shrinks (to one column at
    least) to make room for the terminal's width and for counts longer than the count column."""
    buckets = list(hist.buckets)
    nonzero = [i for i, (_le, c) in enumerate(buckets) if c]
    if not nonzero:
        return []
    peak = max(c for _le, c in buckets)
    wider = max(0, len(str(peak)) - COUNT_W)  # a count longer than its column shifts the bar right
    bar_max = max(1, min(BAR_MAX, width - FIXED - wider))
    head = f"{'usecs':>9} -> {'(lo, hi]':<9} : {'count':<8}"
    out = [head + "  distribution" if len(head) + 14 <= width else head]
    for i in range(nonzero[0], nonzero[-1] + 1):
        le, count = buckets[i]
        lo = "0" if i == 0 else _us(buckets[i - 1][0])
        stars = round(count * bar_max / peak) if count else 0
        if count and not stars:
            stars = 1  # a non-empty bucket always shows
        out.append(LABEL.format(lo=lo, hi=_us(le), count=count) + "*" * stars + " " * (bar_max - stars) + "|")
    return out
