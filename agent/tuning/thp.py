"""thp item: transparent hugepages, ``/sys/kernel/mm/transparent_hugepage/{enabled,defrag}``.

The files list the modes the kernel offers with the current one in brackets
(``always [madvise] never``); the value written is the bare mode. A ``transparent_hugepage=``
kernel command-line parameter is the node owner's boot-time choice for ``enabled``
(Documentation/admin-guide/mm/transhuge.rst): the item then leaves ``enabled`` alone and says so.
"""

from __future__ import annotations

import re

from agent.tuning.base import TuningItem, inside, read_text, write_text
from agent.tuning.profile import THP, THP_DEFRAG, THP_MODES
from host.paths import HostPaths

_CURRENT = re.compile(r"\[([^\]]+)\]")


def offered(text: str, key: str = "enabled") -> tuple[list[str], str | None]:
    """(modes offered, current mode) from a THP control file's contents. The kernel's files always
    bracket the current mode; a file holding one bare word (a fixture tree after a write, where
    nothing rewrites the file as the kernel does) reads as that mode, with the documented modes."""
    current = _CURRENT.search(text)
    if current is None:
        words = text.split()
        return list(THP_MODES if key == "enabled" else THP_DEFRAG), words[0] if len(words) == 1 else None
    return [m.strip("[]") for m in text.split()], current.group(1)


class ThpItem(TuningItem):
    name = "thp"

    def __init__(self, host: HostPaths, spec: THP) -> None:
        super().__init__(host)
        self.spec = {k: v for k, v in (("enabled", spec.enabled), ("defrag", spec.defrag)) if v}

    def boot_choice(self) -> str | None:
        """``transparent_hugepage=`` from the kernel command line, if any."""
        try:
            cmdline = read_text(self.host.cmdline).split()
        except OSError:
            return None
        boot = [a.partition("=")[2] for a in cmdline if a.startswith("transparent_hugepage=")]
        return boot[-1] if boot else None

    def managed_keys(self) -> list[str]:
        deferred = self.boot_choice() is not None
        return [k for k in self.spec if not (deferred and k == "enabled")]

    def read(self, key: str) -> str:
        _, current = offered(read_text(self.host.thp / key), key)
        if current is None:
            raise OSError(f"{self.host.thp / key}: no [current] mode")
        return current

    def wanted(self, key: str, current: str) -> str:
        return self.spec[key]

    def write(self, key: str, value: str) -> None:
        write_text(self.host.thp / key, value, self.host.root)

    def owns(self, key: str) -> bool:
        return key in self.spec

    def journal_key_ok(self, key: str) -> bool:
        return key in ("enabled", "defrag") and inside(self.host.root, self.host.thp / key)

    def journal_value_ok(self, key: str, value: str) -> bool:
        return value in (THP_MODES if key == "enabled" else THP_DEFRAG)

    def notes(self) -> list[str]:
        boot = self.boot_choice()
        if boot is None or "enabled" not in self.spec:
            return []
        want = self.spec["enabled"]
        return [f"thp enabled: left to the kernel command line (transparent_hugepage={boot}), not {want!r}"]
