"""Kernel text addresses -> function names, from ``/proc/kallsyms``, read once and cached.

Used to name lock callers (``probes/lockstat.py``) and to find the bounds of the kernel's locking
code (``__sched_text_start`` .. ``__lock_text_end``). Only text symbols (types t/T, and module
text) are kept, sorted by address; a lookup is a bisection. The addresses are hidden (all zero)
unless the reader has CAP_SYSLOG and ``kernel.kptr_restrict`` allows it (Documentation/admin-guide/
sysctl/kernel.rst): then :class:`KernelSymbols` is empty and says so through ``available``.
"""

from __future__ import annotations

import bisect
from functools import lru_cache
from pathlib import Path


class KernelSymbols:
    """Sorted text symbols of the running kernel (and its modules)."""

    def __init__(self, path: Path | str = "/proc/kallsyms") -> None:
        entries: list[tuple[int, str]] = []
        self.by_name: dict[str, int] = {}
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                addr = int(parts[0], 16)
                if not addr:
                    continue
                name = parts[2]
                self.by_name.setdefault(name, addr)
                if parts[1] in ("t", "T"):
                    entries.append((addr, name))
        entries.sort()
        self._addrs = [a for a, _ in entries]
        self._names = [n for _, n in entries]
        self.function = lru_cache(maxsize=65536)(self._function)

    @property
    def available(self) -> bool:
        return bool(self._addrs)

    def address(self, name: str) -> int | None:
        return self.by_name.get(name)

    def _function(self, addr: int) -> str | None:
        """Name of the function containing ``addr``, or None below the first symbol."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        return self._names[i] if i >= 0 else None

    def caller(self, return_address: int) -> str | None:
        """The function a return address lies in: the call may be a function's last instruction,
        whose return address is already the next symbol, so the byte before it is looked up."""
        return self.function(return_address - 1)
