"""probes/reclaim.py: the smaps reading, and dropping the compiler's pages without breaking it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from probes import bpfsys, reclaim
from probes.base import KernelFacts

REPO = Path(__file__).resolve().parents[2]

SMAPS = """\
00400000-0041f000 r--p 00000000 08:01 131 /usr/bin/python3.11
Size:                124 kB
Rss:                 120 kB
Anonymous:             0 kB
VmFlags: rd mr mw me dw sd
7f0000000000-7f0006000000 r-xp 00100000 08:01 77 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Size:              98304 kB
Rss:               48644 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me sd
7f0006000000-7f0006800000 r--p 06100000 08:01 77 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Size:               8192 kB
Rss:                7612 kB
Anonymous:          7612 kB
VmFlags: rd mr mw me ac sd
7f0006800000-7f0006900000 rw-p 06900000 08:01 77 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Size:               1024 kB
Rss:                1024 kB
Anonymous:          1024 kB
VmFlags: rd wr mr mw me ac sd
7f0007000000-7f0007100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                 512 kB
Anonymous:           512 kB
VmFlags: rd wr mr mw me ac sd
"""


def test_smaps_mappings_and_the_compiler_s_read_only_ones(tmp_path: Path) -> None:
    smaps = tmp_path / "smaps"
    smaps.write_text(SMAPS)
    got = reclaim.mappings(smaps)
    assert [(m.start, m.perms, m.rss_kib, m.anonymous_kib) for m in got] == [
        (0x400000, "r--p", 120, 0),
        (0x7F0000000000, "r-xp", 48644, 0),
        (0x7F0006000000, "r--p", 7612, 7612),
        (0x7F0006800000, "rw-p", 1024, 1024),
        (0x7F0007000000, "rw-p", 512, 512),
    ]
    assert got[4].path == ""
    # the writable mapping and the python binary are not the compiler's
    assert [m.perms for m in reclaim.compiler_mappings(smaps)] == ["r-xp", "r--p"]


def compiler_text_kib() -> int:
    return sum(m.rss_kib for m in reclaim.compiler_mappings() if "x" in m.perms)


@pytest.mark.bpf
def test_compiler_pages_are_dropped_and_compiling_again_still_works(header_cache: Path) -> None:
    KernelFacts(cache_dir=header_cache).headers.apply_env()
    from bcc import BPF

    def compile_and_run() -> int:
        bpf = BPF(text=b"int one(void *ctx) { return 1; }")
        try:
            return bpfsys.prog_test_run_raw_tp(bpf.load_func(b"one", BPF.RAW_TRACEPOINT).fd, (0,))
        finally:
            bpf.cleanup()

    assert compile_and_run() == 1
    assert compiler_text_kib() > 4096  # clang and LLVM ran: megabytes of their code are resident
    copied = [m for m in reclaim.compiler_mappings() if m.anonymous_kib]
    dropped = reclaim.release_compiler_pages()
    assert dropped > 4096 and compiler_text_kib() < 1024
    # pages with a private copy (relocated read-only data) were left alone
    assert all(m.rss_kib == old.rss_kib for old in copied for m in reclaim.compiler_mappings() if m.start == old.start)
    assert compile_and_run() == 1  # the code comes back from the file when it runs again


HEAP_PROGRAM = """
import ctypes, sys
from probes import reclaim

if sys.argv[1] == "tuned":
    assert reclaim.tune_malloc()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(8 << 20))  # a large block freed: glibc raises its mmap threshold above 8 MiB
before = reclaim.rss_kib()
block = libc.malloc(6 << 20)  # a scrape's body, say
ctypes.memset(block, 1, 6 << 20)
libc.free(block)
print(reclaim.rss_kib() - before)
"""


@pytest.mark.parametrize("arm", ["tuned", "default"])
def test_a_freed_large_buffer_leaves_the_process_once_malloc_is_tuned(arm: str) -> None:
    """glibc's dynamic mmap threshold keeps a freed 6 MiB block resident after an 8 MiB one was
    freed; with tune_malloc() (the agent, before its threads) it is unmapped on free."""
    out = subprocess.run(
        [sys.executable, "-c", HEAP_PROGRAM, arm], cwd=REPO, capture_output=True, text=True, check=True
    )
    kept_kib = int(out.stdout)
    if arm == "tuned":
        assert kept_kib < 1024, kept_kib
    else:  # the behaviour tune_malloc() is there for
        assert kept_kib > 4096, kept_kib
