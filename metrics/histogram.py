"""Latency histogram layout shared by every probe: kernel slots -> Prometheus cumulative buckets.

Defined once here and passed to the C as ``-DNSLOTS`` (``cflags()``); the slot function itself is
``latency_slot()`` in ``common.bpf.h`` and :func:`slot_of` is its reference, which the tests run
against the compiled C on boundary values (``BPF_PROG_TEST_RUN``).

Slot s < NSLOTS-1 counts durations d with ``2^(s-1) µs < d <= 2^s µs`` (slot 0: ``d <= 1 µs``,
zero included), so slot s maps one-to-one onto the bucket ``le = 2^s µs`` and a duration is in
every bucket whose ``le`` is at least the duration (Prometheus' ``le`` is inclusive). The last slot
counts what is above ``2^(NSLOTS-2) µs`` (4.19 s) and becomes ``+Inf``. A histogram row in a
BPF map is NSLOTS counts followed by the sum of the durations in ns (``ROW_WORDS`` u64 words).
"""

from __future__ import annotations

from collections.abc import Sequence

NSLOTS = 24  # 23 finite bounds (1 µs .. 4.19 s) + Inf: the contract's "at most 24 buckets"
ROW_WORDS = NSLOTS + 1  # slot counts, then the sum in ns
BUCKET_BOUNDS = tuple(2**s / 1e6 for s in range(NSLOTS - 1))  # seconds
BUCKET_LE = (*(repr(b) for b in BUCKET_BOUNDS), "+Inf")


def slot_of(ns: int) -> int:
    """The slot a duration of ``ns`` nanoseconds is counted in (reference for ``latency_slot``)."""
    us = -(-ns // 1000)  # ceil
    if us <= 1:
        return 0
    return min((us - 1).bit_length(), NSLOTS - 1)


def cflags() -> list[str]:
    return [f"-DNSLOTS={NSLOTS}"]


def cumulative_buckets(slots: Sequence[int]) -> list[tuple[str, int]]:
    """Buckets for ``HistogramMetricFamily.add_metric``: [(le, cumulative count), ..., ("+Inf", n)]."""
    if len(slots) != NSLOTS:
        raise ValueError(f"expected {NSLOTS} slots, got {len(slots)}")
    out: list[tuple[str, int]] = []
    total = 0
    for le, count in zip(BUCKET_LE, slots, strict=True):
        total += count
        out.append((le, total))
    return out
