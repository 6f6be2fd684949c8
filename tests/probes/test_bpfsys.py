"""bpf(2) commands of probes/bpfsys.py that the other tests do not already drive: run-time stats
held by an fd, and a program's counters read from its fdinfo."""

from __future__ import annotations

import errno
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


@pytest.mark.bpf
def test_batch_reads_return_the_rows_asked_for_or_erange(header_cache: Path) -> None:
    """Reads inside a 64-entry array return exactly those rows; a range reaching past its end, or
    starting past it, is ERANGE (an array's get_next_key answers 0 past the end, so a start two
    past the end used to read rows 0, 1, ... back in their place)."""
    KernelFacts(cache_dir=header_cache).headers.apply_env()
    from bcc import BPF

    bpf = BPF(text=b"BPF_ARRAY(rows, u64, 64);")
    try:
        table = bpf[b"rows"]
        for i in range(64):
            table[table.Key(i)] = table.Leaf(1000 + i)
        fd = table.get_fd()

        def read(start: int, count: int) -> list[int]:
            return bpfsys.lookup_batch(fd, start, count, 8, percpu=False)[:, 0, 0].tolist()

        assert read(0, 3) == [1000, 1001, 1002]
        assert read(30, 2) == [1030, 1031]
        assert read(62, 2) == [1062, 1063]
        assert read(63, 1) == [1063]
        for start, count in ((63, 2), (64, 1), (65, 2), (69, 3), (2**32 - 1, 1), (-1, 1)):
            with pytest.raises(bpfsys.BPFSyscallError) as e:
                read(start, count)
            assert e.value.errno == errno.ERANGE, (start, count)
    finally:
        bpf.cleanup()


@pytest.mark.parametrize(
    ("listed", "count"), [("0\n", 1), ("0-1\n", 2), ("0-95\n", 96), ("0-3,8-11\n", 8), ("0,2,4-5\n", 4)]
)
def test_possible_cpus_counts_the_cpus_listed(tmp_path: Path, listed: str, count: int) -> None:
    """Per-CPU map values have one slot per possible CPU, packed: a list with gaps counts its CPUs."""
    cpu = tmp_path / "devices/system/cpu"
    cpu.mkdir(parents=True)
    (cpu / "possible").write_text(listed)
    assert bpfsys.possible_cpus(str(tmp_path)) == count
