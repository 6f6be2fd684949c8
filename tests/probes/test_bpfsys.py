"""bpf(2) commands of probes/bpfsys.py that the other tests do not already drive: run-time stats
held by an fd, and a program's counters read from its fdinfo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from probes import bpfsys
from probes.base import KernelFacts

STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
RUNS = 100


def test_prog_stats_of_what_is_not_a_program_is_none(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    os.close(fd)
    assert bpfsys.prog_stats(fd) is None  # closed: no fdinfo
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert bpfsys.prog_stats(fd) is None  # open, but a directory
    finally:
        os.close(fd)


@pytest.mark.bpf
def test_a_program_is_timed_only_while_the_stats_fd_is_held(header_cache: Path) -> None:
    """A program that is never attached, run exactly RUNS times by BPF_PROG_TEST_RUN (which goes
    through the same accounting as a hooked run: include/linux/filter.h bpf_prog_run)."""
    assert STATS_SYSCTL.read_text().strip() == "0", "kernel.bpf_stats_enabled is on here: the test needs it off"
    KernelFacts(cache_dir=header_cache).headers.apply_env()
    from bcc import BPF

    bpf = BPF(text=b"int spin(void *ctx) { u64 x = 0; for (int i = 0; i < 64; i++) x += i; return x & 1; }")
    try:
        fd = bpf.load_func(b"spin", BPF.RAW_TRACEPOINT).fd
        assert bpfsys.prog_stats(fd) == bpfsys.ProgStats(0, 0, 0)
        for _ in range(RUNS):
            bpfsys.prog_test_run_raw_tp(fd, (0,))
        off = bpfsys.prog_stats(fd)
        assert off == bpfsys.ProgStats(0, 0, 0)  # runs without the stats key count nothing
        stats_fd = bpfsys.enable_run_time_stats()
        try:
            assert STATS_SYSCTL.read_text().strip() == "0"  # the fd does not touch the sysctl
            for _ in range(RUNS):
                bpfsys.prog_test_run_raw_tp(fd, (0,))
            held = bpfsys.prog_stats(fd)
        finally:
            os.close(stats_fd)
        for _ in range(RUNS):
            bpfsys.prog_test_run_raw_tp(fd, (0,))
        after = bpfsys.prog_stats(fd)
    finally:
        bpf.cleanup()
    assert held is not None and held.run_cnt == RUNS and held.recursion_misses == 0
    assert 0 < held.run_time_ns / RUNS < 100_000  # a 64-step loop: tens of ns, far below 100 µs
    assert after == held  # closed: the kernel stopped timing
