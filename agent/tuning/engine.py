"""Plan, apply, verify and revert a profile's items, with the journal as the only source of truth
about originals (``agent/tuning/journal.py``), one writer per host (``agent/tuning/lock.py``).

Every change to the host is a *run*, under the host lock: ``apply`` (put back the keys the profile
no longer names - "released" - then set what it names) and ``revert`` (release every key). A run
opens in the journal (``applying``), and before each write it journals the key's original (if
nodetune has not changed that key before) and the key's value at the start of the run (``undo``).
A run ends one of two ways, never a mix:

* it completes: every key holds the run's value (all-desired), released keys leave the journal;
* it fails (a write or read-back, exit 3) or is cut short (SIGKILL, power - finished the next time
  anything loads the journal): every key the run touched gets its ``undo`` value back, so the node
  is exactly as it was before the run (all-original for that run), even for keys an earlier run
  had already changed.

Reboots: kernel-volatile keys (sysctl, THP, IRQ affinity) are back at their boot values, so their
entries are dropped and re-read at the next apply; an entry whose change survives a reboot keeps
its original. Whether it does is decided per entry when the change is written
(``TuningItem.survives``: irqbalance disabled through systemd does, a SIGTERM'd irqbalance on a
host without systemd does not) and recorded in the entry.

Every journal key and value is checked before anything is written: a known item, a key that item
can hold, resolving inside the host root, a value of the key's shape (``journal_value_ok``).
Otherwise :class:`JournalError` (exit 2). A value the journal would have written back that the
refused list forbids (``agent/tuning/refused.py``: a ``|`` core_pattern, a usermode helper) is
written only when the host's own sysctl.d(5) files set exactly that value (systemd-coredump's
pipe) or the caller's profile names the key under ``unsafe:``; else exit 2, nothing written. ``on_step`` is called
after each step (release, journal, write, done): the fault-injection tests kill the process there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

from agent.tuning import lock
from agent.tuning.base import Change, TuningError, TuningItem, Unchangeable
from agent.tuning.irq_affinity import IrqAffinityItem
from agent.tuning.irqbalance import IrqbalanceItem
from agent.tuning.journal import TEMP_PREFIX, Entry, Journal, JournalError
from agent.tuning.kmod import ALLOWED, KmodItem
from agent.tuning.profile import THP
from agent.tuning.refused import refusal
from agent.tuning.sysctl import SysctlItem
from agent.tuning.thp import ThpItem
from host.paths import HostPaths

log = logging.getLogger(__name__)
KNOWN = ("sysctl", "thp", "irqbalance", "irq_affinity", "kmod")


class ApplyFailed(Exception):
    """A run failed and was undone. ``item`` names the item that failed (the metric's label);
    ``restored`` lists the keys this run had written and put back, ``unrestored`` the keys whose
    undo failed (they hold the run's value)."""

    def __init__(
        self,
        message: str,
        restored: list[Change],
        unrestored: list[str],
        item: str = "engine",
        operation: str = "apply",
    ) -> None:
        super().__init__(message)
        self.restored = restored
        self.unrestored = unrestored
        self.item = item
        self.operation = operation

    def outcome(self) -> str:
        """What happened to the host, truthfully."""
        if self.unrestored:
            return f"{self.operation} failed; could NOT put back {', '.join(self.unrestored)} (still journaled)"
        if not self.restored:
            return f"{self.operation} failed before writing anything"
        return f"{self.operation} failed and was rolled back ({', '.join(c.key for c in self.restored)} put back)"


def writer(host: HostPaths, item: str) -> TuningItem:
    """An item that can read and write any of its keys (for revert: the profile may be gone)."""
    if item == "sysctl":
        return SysctlItem(host, {})
    if item == "thp":
        return ThpItem(host, THP())
    if item == "irqbalance":
        return IrqbalanceItem(host, False)
    if item == "irq_affinity":
        return IrqAffinityItem(host, None)
    if item == "kmod":
        return KmodItem(host, list(ALLOWED))
    raise TuningError(f"journal names an unknown item {item!r}")


class Engine:
    def __init__(
        self,
        host: HostPaths,
        items: list[TuningItem],
        profile: str = "",
        on_step: Callable[[str], None] | None = None,
        lock_timeout_s: float | None = None,
        on_lock_wait: Callable[[], None] | None = None,
        unsafe: Iterable[str] = (),
    ) -> None:
        self.host = host
        self.items = {i.name: i for i in items}
        self.profile = profile
        self.on_step = on_step or (lambda step: None)
        self.lock_timeout_s = lock_timeout_s  # None: lock.DEFAULT_TIMEOUT_S
        self.on_lock_wait = on_lock_wait or self._say_waiting
        self.messages: list[str] = []  # what load() found and did (reboot, interrupted run)
        self.unsafe = frozenset(unsafe)  # sysctl keys the caller's profile names under unsafe:

    def _say_waiting(self) -> None:
        log.warning("tuning: waiting for the tuning lock on %s (another nodetune holds it)", self.host.journal_dir)

    def _lock(self) -> AbstractContextManager[None]:
        timeout = lock.DEFAULT_TIMEOUT_S if self.lock_timeout_s is None else self.lock_timeout_s
        return lock.host_lock(self.host.journal_dir, timeout, self.on_lock_wait)

    def _item(self, item: str) -> TuningItem:
        return self.items.get(item) or writer(self.host, item)

    # --- journal ------------------------------------------------------------------------------
    def load(self) -> Journal:
        """The journal, after handling a reboot and finishing an interrupted run (undo), under the
        host lock. Without a journal directory there is nothing to finish (nothing is created)."""
        if not self.host.journal_dir.is_dir():
            return Journal(self.host.journal_dir / "tuning-journal.json", self.host.boot_id())
        with self._lock():
            return self._load()

    def interrupted(self) -> bool:
        """Whether the journal holds a run in progress, read without the lock (a hint that costs one
        small file read: ``load()`` decides under the lock, where a run still in progress in another
        process has ended). A journal that cannot be read is not a run in progress."""
        if not self.host.journal_dir.is_dir():
            return False
        try:
            return Journal.load(self.host.journal_dir, self.host.boot_id()).applying is not None
        except JournalError:
            return False

    def _check_keys(self, j: Journal) -> None:
        """Every key the journal names is one nodetune manages, inside the host root, and every
        value one its item could have read there."""
        values = [(jk, e.original) for jk, e in j.entries.items()] + list(j.undo.items())
        for jk, value in [*values, *((jk, None) for jk in j.releasing)]:
            item, sep, key = jk.partition("/")
            try:
                generic = writer(self.host, item) if item in KNOWN or item not in self.items else self.items[item]
                ok = bool(sep) and generic.journal_key_ok(key)
            except TuningError:
                ok = False
            if not ok:
                raise JournalError(
                    f"{j.path}: entry {jk!r} is not a key nodetune manages under {self.host.root}; "
                    "nothing was done: fix or remove the journal by hand"
                )
            if value is not None and not generic.journal_value_ok(key, value):
                raise JournalError(
                    f"{j.path}: entry {jk!r} holds {value!r}, not a value {item} {key} can hold; "
                    "nothing was done: fix or remove the journal by hand"
                )

    def _check_refused(self, j: Journal, writes: Iterable[tuple[str, str]]) -> None:
        """Values read from the journal that this run would write back: none the refused list
        forbids, unless the host's sysctl.d files set exactly that value or the profile names the
        key under unsafe: (a journal is a file; a forged '|' core_pattern is a root shell)."""
        for jk, value in writes:
            item, _, key = jk.partition("/")
            if item != "sysctl" or key in self.unsafe:
                continue
            why = refusal(key, value)
            if why and " ".join(value.split()) not in SysctlItem(self.host, {}).host_conf_values(key):
                raise JournalError(
                    f"{j.path}: entry {jk!r} would put back {value!r}, which is refused ({why}): no sysctl.d "
                    f"file of the host sets it. Nothing was done: revert with the profile that names {key} "
                    "under 'unsafe:', or fix the journal by hand"
                )

    def _load(self) -> Journal:
        boot_id = self.host.boot_id()
        for stale in self.host.journal_dir.glob(f"{TEMP_PREFIX}*"):  # a writer killed inside save()
            stale.unlink(missing_ok=True)  # under the lock: no save() is in progress
        j = Journal.load(self.host.journal_dir, boot_id)
        self._check_keys(j)
        changed = False
        if j.boot_id != boot_id and (j.entries or j.applying is not None):
            kept = {jk: e for jk, e in j.entries.items() if self._survives(jk, e)}
            dropped = len(j.entries) - len(kept)
            self.messages.append(
                f"rebooted since the journal was written: the kernel holds its boot values, so {dropped} "
                f"journaled original(s) are dropped and re-read at the next apply; {len(kept)} change(s) "
                "that survive a reboot keep their originals"
            )
            j.undo = {jk: v for jk, v in j.undo.items() if self._survives(jk, j.entries.get(jk))}
            j.entries = kept
            j.releasing = [jk for jk in j.releasing if jk in kept]
            changed = True
        j.boot_id = boot_id
        if j.applying is not None:
            run = j.applying
            self._check_refused(j, j.undo.items())
            unrestored = self._undo(j)
            self.messages.append(
                f"an apply (run {run}) was interrupted: it was undone"
                + (f", except {', '.join(unrestored)}" if unrestored else "")
            )
        elif changed:
            self._store(j)
        return j

    def _survives(self, jk: str, entry: Entry | None) -> bool:
        """The entry's own record; an entry of an older journal (or an undo value without an entry)
        takes its item's default."""
        if entry is not None and entry.survives is not None:
            return entry.survives
        return bool(getattr(self._item(jk.split("/", 1)[0]), "survives_reboot", False))

    def _store(self, j: Journal) -> None:
        if j.entries or j.applying is not None:
            j.save()
        else:
            j.remove()

    def _undo(self, j: Journal) -> list[str]:
        """Put back the value every key held when the open run began (newest write first), forget
        the run's new entries, close the run. Returns the keys that could not be put back."""
        run = j.applying
        unrestored: list[str] = []
        for jk, value in reversed(list(j.undo.items())):
            item, key = jk.split("/", 1)
            w = self._item(item)
            try:
                try:
                    current = w.read(key)
                except OSError:
                    current = None
                if current is None or not w.same(key, current, value):
                    w.write(key, value)
            except (OSError, TuningError) as e:
                log.error("tuning: putting back %s %r failed: %s", jk, value, e)
                unrestored.append(jk)
        for jk in [k for k, e in j.entries.items() if e.run == run and k not in unrestored]:
            del j.entries[jk]
        j.undo, j.releasing, j.applying = {}, [], None
        self._store(j)
        return unrestored

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
        """Release the keys the profile no longer names, then apply item by item, each planned just
        before it is applied: an item can depend on an earlier one (IRQs are pinned only once
        irqbalance is stopped)."""
        return self._run(revert=False)

    def revert(self) -> list[Change]:
        """Put back every journaled original and clear the journal (one run: all or nothing)."""
        return self._run(revert=True)

    def _released(self, j: Journal, revert: bool) -> dict[str, Entry]:
        """Journaled keys this run puts back: all of them for a revert, else those the profile no
        longer names."""
        out = {}
        for jk, entry in sorted(j.entries.items()):
            item, key = jk.split("/", 1)
            if revert or item not in self.items or not self.items[item].owns(key):
                out[jk] = entry
        return out

    def _run(self, revert: bool) -> list[Change]:
        operation = "revert" if revert else "apply"
        with self._lock():
            j = self._load()
            run = j.run + 1
            opened = False
            done: list[Change] = []
            failing = "engine"

            def open_run() -> None:
                nonlocal opened
                if not opened:  # the run opens with its first change
                    j.run, j.applying, j.undo, j.releasing, opened = run, run, {}, [], True
                    if not revert:
                        j.profile = self.profile

            try:
                # Released keys: their current values are journaled as the undo log in one save,
                # then each is written back (putting back a key not yet written is a no-op).
                release = self._released(j, revert)
                current: dict[str, str] = {}
                for jk in list(release):
                    failing = jk.split("/")[0]
                    try:
                        current[jk] = self._item(failing).read(jk.split("/", 1)[1])
                    except FileNotFoundError:  # the key left the host (NIC or module gone): so did its value
                        del release[jk], j.entries[jk]
                        self.messages.append(f"{jk} no longer exists on the host: its journal entry is dropped")
                self._check_refused(j, ((jk, e.original) for jk, e in release.items()))
                if release:
                    open_run()
                    j.undo.update(current)
                    j.releasing.extend(release)
                    j.save()
                for jk, entry in release.items():
                    item, key = jk.split("/", 1)
                    failing = item
                    w = self._item(item)
                    self.on_step(f"release {jk}")
                    if not w.same(key, current[jk], entry.original):
                        w.write(key, entry.original)
                        done.append(Change(item, key, current[jk], entry.original))
                        self.on_step(f"write {jk}")
                for item in [] if revert else self.items.values():
                    failing = item.name
                    for c in item.plan():
                        open_run()
                        jk = Journal.key(c.item, c.key)
                        j.undo.setdefault(jk, c.old)
                        if jk not in j.entries:
                            j.entries[jk] = Entry(c.old, run, item.survives(c.key))
                        j.save()
                        self.on_step(f"journal {jk}")
                        try:
                            item.write(c.key, c.new)
                        except Unchangeable as e:
                            self.messages.append(str(e))
                            if j.entries[jk].run == run:
                                del j.entries[jk]
                            j.undo.pop(jk, None)
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
                unrestored = self._undo(j) if opened else []
                restored = [c for c in done if Journal.key(c.item, c.key) not in unrestored]
                raise ApplyFailed(str(e), restored, unrestored, failing, operation) from None
            if not opened:
                if revert:
                    j.remove()
                elif self.messages:
                    self._store(j)  # entries of vanished keys dropped
                return []
            for jk in j.releasing:
                j.entries.pop(jk, None)
            j.undo, j.releasing, j.applying = {}, [], None
            self._store(j)
            self.on_step("done")
            return done

    def notes(self) -> list[str]:
        return [n for item in self.items.values() for n in item.notes()]
