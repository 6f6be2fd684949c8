"""What every tuning item is: keys with a current and a wanted value, read and written on the host.

An item reads its keys (``read``), says what each should be given what it is now (``wanted``: a
``>=`` limit keeps a higher current value), and writes one (``write``). ``plan()`` is pure over
the reads: the list of ``Change(item, key, old, new)``, empty when in sync. Journaling,
read-back and rollback are the engine's (``agent/tuning/engine.py``), the same for every item.
Paths come from :class:`host.paths.HostPaths`, so ``--host-root`` points every item at a host
mounted elsewhere and tests use fixture trees.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from pathlib import Path

from host.paths import HostPaths


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


def read_text(path: Path) -> str:
    return path.read_text().strip()


def inside(root: Path, path: Path) -> bool:
    """Whether ``path``, every symlink resolved, is under ``root`` (also resolved): the one
    containment check of every item's files, for profile keys and journal keys alike."""
    top = os.path.realpath(root)
    return os.path.realpath(path).startswith(top.rstrip(os.sep) + os.sep)


def write_text(path: Path, value: str, root: Path) -> None:
    """One write(2) of the whole value, as sysctl(8) does: procfs and sysfs take it at once. The
    file must resolve inside the host's ``root``, and its last component is opened with O_NOFOLLOW
    (a symlink swapped in after the check is ELOOP, not followed); procfs and sysfs control files
    are never symlinks."""
    if not inside(root, path):
        raise OSError(f"{path} resolves outside the host root {root}")
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
    try:
        os.write(fd, (value + "\n").encode())
    finally:
        os.close(fd)


class TuningItem(abc.ABC):
    name: str = ""
    survives_reboot: bool = False
    """Whether the item's change outlives a reboot (a disabled systemd unit does; a sysctl, THP or
    IRQ affinity is back at its boot value): its journaled originals are kept across a new boot id."""

    def __init__(self, host: HostPaths) -> None:
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

    def owns(self, key: str) -> bool:
        """Whether the profile still names ``key`` (a journaled key it no longer names is put back to
        its original). Differs from ``managed_keys`` where that depends on the host's state."""
        return key in self.managed_keys()

    def journal_key_ok(self, key: str) -> bool:
        """Whether ``key``, read from the journal, is one this item can hold on this host (the
        item as ``engine.writer`` builds it: every key it could ever manage), its file inside the
        host root."""
        return key in self.managed_keys()

    def journal_value_ok(self, key: str, value: str) -> bool:
        """Whether ``value``, read from the journal, is one this item could have read from ``key``
        (so writing it back is a value of the key's shape, never a crash or something else)."""
        return "\n" not in value and "\0" not in value

    def survives(self, key: str) -> bool:
        """Whether a change written now outlives a reboot; recorded in the key's journal entry when
        it is first changed (``survives_reboot`` is the item's default)."""
        return self.survives_reboot
