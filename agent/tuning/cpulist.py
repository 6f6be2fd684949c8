"""Kernel CPU lists ("0-3,8,10-11"): parse, validate against the online CPUs, format canonically
(as ``/proc/irq/N/smp_affinity_list`` prints them)."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"^[0-9]+$")  # ASCII, as the kernel's bitmap_parselist(); str.isdigit() takes "²"


class CpuListError(ValueError):
    pass


def parse_cpulist(text: str) -> list[int]:
    cpus: set[int] = set()
    text = text.strip()
    if not text:
        raise CpuListError("empty CPU list")
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        lo, hi = lo.strip(), hi.strip()
        if not _NUMBER.match(lo) or (sep and not _NUMBER.match(hi)):
            raise CpuListError(f"{part!r} is not a CPU number or range")
        first, last = int(lo), int(hi) if sep else int(lo)
        if first > last or last >= 8192:
            raise CpuListError(f"{part!r}: bad range")
        cpus.update(range(first, last + 1))
    return sorted(cpus)


def format_cpulist(cpus: list[int]) -> str:
    out: list[str] = []
    for cpu in sorted(set(cpus)):
        if out and cpu == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{cpu}"
        else:
            out.append(str(cpu))
    return ",".join(out)
