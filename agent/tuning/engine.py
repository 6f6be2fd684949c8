"""Plan, apply, verify and revert a profile's items, with the journal as the only source of truth
about originals (``agent/tuning/journal.py``).

``apply`` opens a run (``applying`` in the journal), then for each change: journals the original
(if nodetune has not changed that key before) *before* writing, writes, reads back. If a write or
read-back fails, every key written in this run is put back and :class:`ApplyFailed` is raised
(exit 3). A run cut short (SIGKILL, power) is undone from the journal the next time anything
loads it, so the node ends all-original or all-desired for that run, never a mix. Nothing is
reverted on exit. ``on_step`` is called after each step (journal, write, done): the fault-injection
test kills the process there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.tuning.base import Change, TuningError, TuningHost, TuningItem, Unchangeable
from agent.tuning.irq_affinity import IrqAffinityItem
from agent.tuning.irqbalance import IrqbalanceItem
from agent.tuning.journal import Entry, Journal
from agent.tuning.kmod import KmodItem
from agent.tuning.profile import THP
from agent.tuning.sysctl import SysctlItem
from agent.tuning.thp import ThpItem

log = logging.getLogger(__name__)


class ApplyFailed(Exception):
    """A write failed; ``restored`` lists what was put back (and ``unrestored`` what could not be)."""

    def __init__(self, message: str, restored: list[Change], unrestored: list[str]) -> None:
        super().__init__(message)
        self.restored = restored
        self.unrestored = unrestored


def writer(host: TuningHost, item: str) -> TuningItem:
    """An item that can read and write any of its keys (for revert: the profile may be gone)."""
    if item == "sysctl":
        return SysctlItem(host, {})
    if item == "thp":
        return ThpItem(host, THP())
    if item == "irqbalance":
        return IrqbalanceItem(host, None)
    if item == "irq_affinity":
        return IrqAffinityItem(host, None)
    if item == "kmod":
        return KmodItem(host, [])
    raise TuningError(f"journal names an unknown item {item!r}")


class Engine:
    def __init__(
        self,
        host: TuningHost,
        items: list[TuningItem],
        profile: str = "",
        on_step: Callable[[str], None] | None = None,
    ) -> None:
        self.host = host
        self.items = {i.name: i for i in items}
        self.profile = profile
        self.on_step = on_step or (lambda step: None)
        self.messages: list[str] = []  # what load() found and did (reboot, interrupted run)

    # --- journal ------------------------------------------------------------------------------
    def load(self) -> Journal:
        """The journal, after handling a reboot and finishing an interrupted run (undo)."""
        boot_id = self.host.boot_id
        j = Journal.load(self.host.journal_dir, boot_id)
        if j.boot_id != boot_id and (j.entries or j.applying is not None):
            self.messages.append(
                f"rebooted since the journal was written: the kernel holds its boot values, so "
                f"{len(j.entries)} journaled original(s) are dropped and re-read at the next apply"
            )
            j.entries.clear()
            j.applying = None
            j.boot_id = boot_id
            j.remove()
        if j.applying is not None:
            run = j.applying
            undone = []
            for jk, entry in sorted(j.entries.items()):
                if entry.run != run:
                    continue
                item, key = jk.split("/", 1)
                (self.items.get(item) or writer(self.host, item)).write(key, entry.original)
                undone.append(jk)
                del j.entries[jk]
            j.applying = None
            self._store(j)
            self.messages.append(f"an apply (run {run}) was interrupted: restored {len(undone)} original(s)")
        return j

    def _store(self, j: Journal) -> None:
        if j.entries or j.applying is not None:
            j.save()
        else:
            j.remove()

    # --- operations ---------------------------------------------------------------------------
    def plan(self) -> list[Change]:
        """What apply would change, old -> new. Reads only."""
        return [c for item in self.items.values() for c in item.plan()]

    def verify(self) -> dict[tuple[str, str], bool]:
        """(item, key) -> in sync, for every managed key. Reads only."""
        pending = {(c.item, c.key) for c in self.plan()}
        return {
            (item.name, key): (item.name, key) not in pending
            for item in self.items.values()
            for key in item.managed_keys()
        }

    def apply(self) -> list[Change]:
        """Apply item by item, each planned just before it is applied: an item can depend on an
        earlier one (IRQs are pinned only once irqbalance is stopped)."""
        j = self.load()
        run = j.run + 1
        opened = False
        done: list[Change] = []
        try:
            for item in self.items.values():
                for c in item.plan():
                    if not opened:  # the run opens with its first change
                        j.run, j.applying, j.profile, opened = run, run, self.profile, True
                        j.save()
                    jk = Journal.key(c.item, c.key)
                    if jk not in j.entries:
                        j.entries[jk] = Entry(c.old, run)
                        j.save()
                    self.on_step(f"journal {jk}")
                    try:
                        item.write(c.key, c.new)
                    except Unchangeable as e:
                        self.messages.append(str(e))
                        if j.entries[jk].run == run:
                            del j.entries[jk]
                            j.save()
                        continue
                    except OSError as e:
                        raise TuningError(f"{c.item} {c.key}: write {c.new!r} failed: {e.strerror or e}") from None
                    done.append(c)
                    self.on_step(f"write {jk}")
                    back = item.read(c.key)
                    if not item.same(c.key, back, c.new):
                        raise TuningError(f"{c.item} {c.key}: wrote {c.new!r} but it reads back {back!r}")
        except (OSError, TuningError) as e:
            unrestored: list[str] = []
            for c in reversed(done):
                try:
                    self.items[c.item].write(c.key, c.old)
                except OSError:
                    unrestored.append(Journal.key(c.item, c.key))
            # This run's originals are back in place (or were never overwritten): forget them,
            # except where putting one back failed - its original is still needed.
            for jk in [k for k, entry in j.entries.items() if entry.run == run and k not in unrestored]:
                del j.entries[jk]
            j.applying = None
            self._store(j)
            raise ApplyFailed(str(e), done, unrestored) from None
        if not opened:
            return []
        j.applying = None
        self._store(j)
        self.on_step("done")
        return done

    def revert(self) -> list[Change]:
        """Put back every journaled original and clear the journal."""
        j = self.load()
        restored = []
        for jk, entry in sorted(j.entries.items()):
            item, key = jk.split("/", 1)
            w = self.items.get(item) or writer(self.host, item)
            current = w.read(key)
            if not w.same(key, current, entry.original):
                try:
                    w.write(key, entry.original)
                except (OSError, TuningError) as e:
                    self._store(j)
                    raise ApplyFailed(
                        f"{item} {key}: restoring {entry.original!r} failed: {e}", restored, [jk]
                    ) from None
                restored.append(Change(item, key, current, entry.original))
            del j.entries[jk]
        j.remove()
        return restored

    def notes(self) -> list[str]:
        return [n for item in self.items.values() for n in item.notes()]
