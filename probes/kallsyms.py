"""Kernel text addresses -> function names, from ``/proc/kallsyms``.

Used to name lock callers (``probes/lockstat.py``) and to find the bounds of the kernel's locking
code (``__sched_text_start`` .. ``__lock_text_end``). The addresses are hidden (all zero) unless
the reader has CAP_SYSLOG and ``kernel.kptr_restrict`` allows it (Documentation/admin-guide/
sysctl/kernel.rst): then :class:`KernelSymbols` is empty and says so through ``available``.

What is kept is what naming needs, and no Python object per symbol: the text symbols' (types t/T)
start and end addresses in two sorted numpy arrays, and their names in one bytes blob with an
offset array (about 5 MB for a kernel's 120,000 text symbols, against 32 MB as Python tuples and
a name dict). A name is decoded when an address is looked up (cached, bounded).

kallsyms gives no sizes, so a symbol ends where the next text symbol starts, and never past the
end of its region: the core kernel's text (``_stext`` .. ``_etext``), its init text
(``_sinittext`` .. ``_einittext``), or its module (``/proc/modules``: base address and size). The
last symbol of a group with no known region (BPF programs, ftrace trampolines: the ``[bpf]`` and
``[__builtin__ftrace]`` pseudo-modules) ends one page after its start. An address in no symbol is
``None``: a module loaded since the table was read is not named after whatever came below it.
``refresh()`` (on the agent's timer) re-reads the table when ``/proc/modules`` changed.

``find_addresses`` looks up a few core symbols by a scan of the file, without building the table
(0.06 s here against 0.2 s): for checks at load time, which should not wait for the whole table.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

PAGE = 4096
CORE_REGIONS = (("_stext", "_etext"), ("_sinittext", "_einittext"))
_BOUNDS = {name.encode() for pair in CORE_REGIONS for name in pair}


def _modules(path: Path) -> tuple[dict[str, tuple[int, int]], bytes]:
    """{module: (base, end)} from ``/proc/modules`` (``name size refs deps state address``), and
    the file's digest; empty when the kernel has no modules (no such file)."""
    try:
        data = path.read_bytes()
    except OSError:
        return {}, b""
    regions: dict[str, tuple[int, int]] = {}
    for line in data.splitlines():
        words = line.split()
        if len(words) >= 6:
            try:
                base, size = int(words[5], 16), int(words[1])
            except ValueError:
                continue
            if base:
                regions[words[0].decode()] = (base, base + size)
    return regions, hashlib.sha256(data).digest()


def find_addresses(path: Path, names: tuple[str, ...]) -> dict[str, int]:
    """Address of each of ``names`` that is a core-kernel symbol of ``path`` (a kallsyms file;
    lines ``<address> <type> <name>``, module symbols followed by a tab and ``[module]``). A name
    absent, or shown at address 0 (addresses hidden), is left out. Raises OSError."""
    data = path.read_bytes()
    found: dict[str, int] = {}
    for name in names:
        at = data.find(b" " + name.encode() + b"\n")  # a core symbol's line ends with its name
        if at < 0:
            continue
        line = data[data.rfind(b"\n", 0, at) + 1 : at].split()  # address, type
        if len(line) == 2 and int(line[0], 16):
            found[name] = int(line[0], 16)
    return found


class KernelSymbols:
    """Text symbols of the running kernel (and its modules): see the module docstring."""

    def __init__(self, path: Path | str = "/proc/kallsyms", modules: Path | str | None = None) -> None:
        self.path = Path(path)
        self.modules_path = Path(modules) if modules is not None else self.path.with_name("modules")
        self._names_cache: OrderedDict[int, str | None] = OrderedDict()
        self._load()

    def _load(self) -> None:
        regions, self._modules_digest = _modules(self.modules_path)
        with open(self.path, "rb") as f:
            data = f.read()
        # "address type name[\t[module]]" lines, the address zero-padded to a fixed width: the
        # type is at a fixed column, so text symbols (t/T) are picked without splitting every line.
        width = data.find(b" ")
        text = (b" t ", b" T ")
        lines = [line for line in data.split(b"\n") if line[width : width + 3] in text]
        starts = [int(line[:width], 16) for line in lines]
        names, groups = [], []  # name, and b"" or b"\t[module]"
        for line in lines:
            name, _, group = line[width + 3 :].partition(b"\t")
            names.append(name)
            groups.append(group)
        bounds = {n.decode(): starts[i] for i, n in enumerate(names) if n in _BOUNDS and not groups[i]}
        if starts and not any(starts):  # kptr_restrict: every address reads as zero
            starts, names, groups = [], [], []
        order = np.argsort(np.array(starts, dtype=np.uint64), kind="stable")
        start = np.array(starts, dtype=np.uint64)[order]
        codes = {g: n for n, g in enumerate(dict.fromkeys(groups))}  # b"" (the core kernel) and modules
        group = np.array([codes[g] for g in groups], dtype=np.int32)[order]
        # The end of each region a symbol can be in: its module's, or the core region holding it.
        limit = np.full(len(start), np.iinfo(np.uint64).max, dtype=np.uint64)
        for g, n in codes.items():
            module = g.strip(b"[]").decode()
            if module in regions:
                limit[group == n] = regions[module][1]
        for lo_name, hi_name in CORE_REGIONS:
            if lo_name in bounds and hi_name in bounds:
                lo, hi = bounds[lo_name], bounds[hi_name]
                inside = (group == codes.get(b"", -1)) & (start >= lo) & (start <= hi)
                limit[inside] = hi  # the end marker itself (_etext) is empty: nothing lies in it
        following = np.full(len(start), np.iinfo(np.uint64).max, dtype=np.uint64)
        if len(start) > 1:
            same = group[1:] == group[:-1]
            following[:-1] = np.where(same, start[1:], following[:-1])
        # No known region (a BPF program, a trampoline, core text outside _stext.._etext and the
        # init text): at most a page.
        unknown = limit == np.iinfo(np.uint64).max
        limit[unknown] = start[unknown] + PAGE
        end = np.minimum(following, limit)
        ordered = [names[i] for i in order]
        blob = b"\0".join(ordered)
        lengths = np.array([len(n) + 1 for n in ordered], dtype=np.uint64)
        self._start, self._end = start, end
        self._offsets = np.concatenate((np.zeros(1, dtype=np.uint64), np.cumsum(lengths, dtype=np.uint64)))
        self._blob = blob
        self._names_cache.clear()

    @property
    def available(self) -> bool:
        return len(self._start) > 0

    def nbytes(self) -> int:
        """Bytes held for the table (tests and the README's footprint)."""
        return self._start.nbytes + self._end.nbytes + self._offsets.nbytes + len(self._blob)

    def refresh(self) -> bool:
        """Re-read the table if a module was loaded or unloaded since; whether it was."""
        _regions, digest = _modules(self.modules_path)
        if digest == self._modules_digest:
            return False
        self._load()
        return True

    def _name(self, i: int) -> str:
        lo, hi = int(self._offsets[i]), int(self._offsets[i + 1]) - 1
        return self._blob[lo:hi].decode("ascii", "replace")

    def address(self, name: str) -> int | None:
        """Start of the text symbol ``name`` (the first of that name), or None."""
        needle = name.encode()
        at = 0
        blob = self._blob
        while True:
            at = blob.find(needle, at)
            if at < 0:
                return None
            end = at + len(needle)
            if (at == 0 or blob[at - 1] == 0) and (end == len(blob) or blob[end] == 0):
                i = int(np.searchsorted(self._offsets, at, side="right")) - 1
                return int(self._start[i])
            at = end

    def function(self, addr: int) -> str | None:
        """Name of the function containing ``addr``, or None when no text symbol does."""
        cache = self._names_cache
        if addr in cache:
            cache.move_to_end(addr)
            return cache[addr]
        i = int(np.searchsorted(self._start, np.uint64(addr), side="right")) - 1
        name = self._name(i) if i >= 0 and addr < int(self._end[i]) else None
        cache[addr] = name
        if len(cache) > 65536:
            cache.popitem(last=False)
        return name

    def caller(self, return_address: int) -> str | None:
        """The function a return address lies in: the call may be a function's last instruction,
        whose return address is already the next symbol, so the byte before it is looked up."""
        return self.function(return_address - 1)
