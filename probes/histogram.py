"""Kernel log2 histogram slots -> Prometheus cumulative buckets.

The BPF side computes ``slot = bpf_log2l(latency_ns / 1000)``: slot 0 holds latencies under
1 µs and slot s (s >= 1) holds [2^(s-1), 2^s) µs. Slot s therefore maps one-to-one onto the
Prometheus bucket ``le = 2^s µs`` (the contract: power-of-two bounds in seconds from 1 µs,
at most 24 buckets). The last slot is open-ended and becomes ``+Inf``.
"""

from __future__ import annotations

from collections.abc import Sequence

NSLOTS = 24  # keep equal to NSLOTS in the .bpf.c files: 23 finite bounds (1 µs .. 4.19 s) + Inf
BUCKET_BOUNDS = tuple(1e-6 * 2**s for s in range(NSLOTS - 1))


def cumulative_buckets(slots: Sequence[int]) -> list[tuple[str, int]]:
    """Buckets for ``HistogramMetricFamily.add_metric``: [(le, cumulative count), ..., ("+Inf", n)]."""
    if len(slots) != NSLOTS:
        raise ValueError(f"expected {NSLOTS} slots, got {len(slots)}")
    out: list[tuple[str, int]] = []
    total = 0
    for bound, count in zip(BUCKET_BOUNDS, slots[:-1], strict=True):
        total += count
        out.append((repr(bound), total))
    out.append(("+Inf", total + slots[-1]))
    return out
