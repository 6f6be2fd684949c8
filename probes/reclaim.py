"""Give back what compiling the probes left resident in the process, once every probe is loaded.

BCC compiles in-process with clang and LLVM. Once the programs are loaded the agent only reads and
writes maps with bpf(2), so two things the compilation left behind are dead weight for the rest of
the agent's life (profile in bench/footprint.py and the commit that added this module):

* **glibc's free heap**: clang's and LLVM's allocations are freed when BCC's module is done, but
  glibc keeps the freed chunks in its arenas; ``malloc_trim(3)`` returns every free page of every
  arena to the kernel (glibc >= 2.8 also releases free pages inside the heap, not only its top).
* **the compiler's code**: the text and read-only data of ``libLLVM`` and ``libclang-cpp`` that the
  compilation touched (about 75 MiB on Debian 12's LLVM 14) stay mapped, and resident pages of a
  mapping count in the process's RSS. ``madvise(MADV_DONTNEED)`` drops them from the process: for
  a private file mapping the next access reads the page again from the file (madvise(2)), so
  nothing breaks if the compiler runs again (a probe loaded later, a benchmark's arm); only its
  first instructions are slower. Only mappings with no anonymous (copy-on-write) page are
  dropped: those would lose their private contents (relocated read-only data, RELRO), and the
  kernel would hand back the file's unrelocated bytes.

The pages stay in the page cache, shared with any other process that maps the library; the kernel
reclaims them like any clean file page. Kernel interfaces: ``/proc/self/smaps``, ``madvise(2)``.
"""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from host import libc

log = logging.getLogger(__name__)

COMPILER_LIBRARIES = ("libLLVM", "libclang")  # file name prefixes of the compiler BCC links


@dataclass(frozen=True)
class Mapping:
    """One mapping of ``/proc/<pid>/smaps``: its range, permissions, file and page counts (KiB)."""

    start: int
    end: int
    perms: str
    path: str
    rss_kib: int
    anonymous_kib: int


def mappings(smaps: Path = Path("/proc/self/smaps")) -> list[Mapping]:
    """Every mapping of a process with its resident and anonymous KiB."""
    result: list[Mapping] = []
    head: list[str] | None = None
    rss = anon = 0

    def flush() -> None:
        if head is not None:
            start, end = (int(x, 16) for x in head[0].split("-"))
            result.append(Mapping(start, end, head[1], head[5] if len(head) > 5 else "", rss, anon))

    for line in smaps.read_text().splitlines():
        first = line.split(maxsplit=1)[0] if line else ""
        if "-" in first and not first.endswith(":"):  # a mapping's header: start-end perms ...
            flush()
            head, rss, anon = line.split(maxsplit=5), 0, 0
        elif first == "Rss:":
            rss = int(line.split()[1])
        elif first == "Anonymous:":
            anon = int(line.split()[1])
    flush()
    return result


def compiler_mappings(smaps: Path = Path("/proc/self/smaps")) -> list[Mapping]:
    """Read-only mappings of the compiler's libraries (text and data, writable ones excluded)."""
    return [
        m
        for m in mappings(smaps)
        if "w" not in m.perms and os.path.basename(m.path).startswith(COMPILER_LIBRARIES) and m.path.startswith("/")
    ]


def release_compiler_pages() -> int:
    """Drop the compiler's resident read-only pages that have no private copy; KiB dropped."""
    dropped = 0
    for m in compiler_mappings():
        if m.anonymous_kib or not m.rss_kib:  # a private copy would be lost (see module docstring)
            continue
        try:
            libc.madvise(m.start, m.end - m.start, mmap.MADV_DONTNEED)
        except OSError as e:
            log.warning("madvise(%s %x-%x): %s", m.path, m.start, m.end, e.strerror)
            continue
        dropped += m.rss_kib
    return dropped


def rss_kib(status: Path = Path("/proc/self/status")) -> int:
    """The process's resident set (``VmRSS``), KiB."""
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def tune_malloc(mmap_threshold: int = 256 * 1024, arenas: int = 2) -> bool:
    """Keep a long-lived process's heap from ratcheting up: glibc raises its mmap threshold every
    time a large block is freed (up to 32 MiB), after which each scrape's megabyte-sized buffers
    (the body, its gzip) come from the heap and stay resident when freed; and every thread that
    allocates may get an arena of its own (up to 8 per core). Fixing the thresholds turns the
    dynamic raise off (mallopt(3)); large buffers are then mmapped and unmapped on free. The
    arena limit binds arenas made from then on. False when libc has no mallopt (musl)."""
    ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(M_TRIM_THRESHOLD, 2 * mmap_threshold)
    return ok and libc.mallopt(M_ARENA_MAX, arenas)


def trim_heap() -> bool:
    """``malloc_trim(0)``: return glibc's free heap pages to the kernel. False when libc has none
    (musl)."""
    return libc.malloc_trim()
