"""What every tuning item is: keys with a current and a wanted value, read and written on the host.

An item reads its keys (``read``), says what each should be given what it is now (``wanted``: a
``>=`` limit keeps a higher current value), and writes one (``write``). ``plan()`` is pure over
the reads: the list of ``Change(item, key, old, new)``, empty when in sync. Journaling,
read-back and rollback are the engine's (``agent/tuning/engine.py``), the same for every item.
Paths come from :class:`TuningHost`, so ``--host-root`` points every item at a host mounted
elsewhere and tests use fixture trees.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Change:
    item: str
    key: str
    old: str
    new: str

    def describe(self) -> str:
        return f"{self.item} {self.key}: {self.old!r} -> {self.new!r}"


class TuningError(Exception):
    """A write or read-back failed; the message names the item and key."""


class Unchangeable(TuningError):
    """The kernel will never take this write (an IRQ it cannot move): skip the key, not the run."""


@dataclass(frozen=True)
class TuningHost:
    """Where the host's files are: ``root`` is the host's ``/`` (``--host-root``)."""

    root: Path = Path("/")
    state_dir: Path | None = None  # the journal's directory; default <root>/var/lib/nodetune

    @property
    def proc_sys(self) -> Path:
        return self.root / "proc/sys"

    @property
    def thp(self) -> Path:
        return self.root / "sys/kernel/mm/transparent_hugepage"

    @property
    def cmdline(self) -> Path:
        return self.root / "proc/cmdline"

    @property
    def boot_id(self) -> str:
        try:
            return (self.root / "proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            return ""

    @property
    def journal_dir(self) -> Path:
        return self.state_dir or self.root / "var/lib/nodetune"

    @property
    def sysctl_conf(self) -> list[Path]:
        """sysctl.d(5) locations, in the order systemd-sysctl reads them."""
        dirs = [self.root / d for d in ("etc/sysctl.d", "run/sysctl.d", "usr/local/lib/sysctl.d", "usr/lib/sysctl.d")]
        files: dict[str, Path] = {}
        for d in dirs:
            try:
                for f in sorted(d.glob("*.conf")):
                    files.setdefault(f.name, f)  # the first directory's file of a name wins
            except OSError:
                continue
        out = [files[name] for name in sorted(files)]
        conf = self.root / "etc/sysctl.conf"
        return [*out, conf] if conf.is_file() else out


def read_text(path: Path) -> str:
    return path.read_text().strip()


def write_text(path: Path, value: str) -> None:
    """One write(2) of the whole value, as sysctl(8) does: procfs and sysfs take it at once."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, (value + "\n").encode())
    finally:
        os.close(fd)


class TuningItem(abc.ABC):
    name: str = ""

    def __init__(self, host: TuningHost) -> None:
        self.host = host

    @abc.abstractmethod
    def managed_keys(self) -> list[str]:
        """The keys this item manages, in apply order."""

    @abc.abstractmethod
    def read(self, key: str) -> str:
        """The key's current value on the host (raises OSError if unreadable)."""

    @abc.abstractmethod
    def wanted(self, key: str, current: str) -> str:
        """What the key should hold, given its current value."""

    @abc.abstractmethod
    def write(self, key: str, value: str) -> None:
        """Write ``value`` (as read back by ``read``) to the key."""

    def same(self, key: str, current: str, value: str) -> bool:
        return " ".join(current.split()) == " ".join(value.split())

    def plan(self) -> list[Change]:
        changes = []
        for key in self.managed_keys():
            current = self.read(key)
            want = self.wanted(key, current)
            if not self.same(key, current, want):
                changes.append(Change(self.name, key, current, want))
        return changes

    def notes(self) -> list[str]:
        """Facts worth telling the operator (a key managed elsewhere, a boot parameter)."""
        return []
