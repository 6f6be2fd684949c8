"""Histogram layout: the kernel's slot function (the real compiled C) against the exported `le`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from metrics import histogram
from metrics.histogram import BUCKET_BOUNDS, BUCKET_LE, NSLOTS, cumulative_buckets, slot_of
from probes import bpfsys
from probes.base import KernelFacts

BOUNDARIES = sorted(
    {0, 1, 999, 1000, 1001, 1500, 1999, 2000, 2001, 2**63, 2**64 - 1}
    | {v for k in range(NSLOTS + 2) for v in (1000 * 2**k - 1, 1000 * 2**k, 1000 * 2**k + 1)}
)


def le_contains(le: str, ns: int) -> bool:
    """Prometheus' rule: a duration is in every bucket whose le is at least the duration."""
    return le == "+Inf" or ns <= round(float(le) * 1e9)


@pytest.mark.parametrize("ns", BOUNDARIES)
def test_reference_slot_is_the_lowest_bucket_holding_the_duration(ns: int) -> None:
    holding = [i for i, le in enumerate(BUCKET_LE) if le_contains(le, ns)]
    assert slot_of(ns) == holding[0]


def test_bounds_are_powers_of_two_microseconds() -> None:
    assert BUCKET_LE[0] == "1e-06" and BUCKET_LE[-1] == "+Inf" and len(BUCKET_LE) == NSLOTS <= 24
    assert all(b == 2**i / 1e6 for i, b in enumerate(BUCKET_BOUNDS))


def test_cumulative_buckets() -> None:
    slots = [1] + [0] * (NSLOTS - 2) + [2]
    out = cumulative_buckets(slots)
    assert out[0] == ("1e-06", 1) and out[-2] == ("4.194304", 1) and out[-1] == ("+Inf", 3)
    with pytest.raises(ValueError):
        cumulative_buckets([0] * (NSLOTS - 1))


@pytest.mark.bpf
def test_kernel_slot_function_matches_the_exported_le(header_cache: Path) -> None:
    """latency_slot() of common.bpf.h, compiled and run in the kernel with BPF_PROG_TEST_RUN."""
    KernelFacts(cache_dir=header_cache).headers.apply_env()
    from bcc import BPF

    text = resources.files("probes").joinpath("common.bpf.h").read_text()
    text += "\nint slot_of(struct bpf_raw_tracepoint_args *ctx) { return latency_slot(ctx->args[0]); }\n"
    bpf = BPF(text=text.encode(), cflags=[*histogram.cflags(), "-DNSTATS=1"])
    try:
        fn = bpf.load_func(b"slot_of", BPF.RAW_TRACEPOINT)
        got = {ns: bpfsys.prog_test_run_raw_tp(fn.fd, (ns,)) for ns in BOUNDARIES}
    finally:
        bpf.cleanup()
    assert got == {ns: slot_of(ns) for ns in BOUNDARIES}
    assert got[0] == got[1000] == 0 and got[1001] == 1 and got[2000] == 1 and got[2001] == 2
