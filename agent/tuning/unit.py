"""The agent's tuning unit: keeps a profile checked (``observe``) or applied (``enforce``) on the
agent's timer, and exports what it found. Files: the profile (``--profile``, or the built-in
default), the host's sysctl/THP files through ``HostPaths``, the journal.

On each tick (never on a scrape): re-read the profile file when its identity changed (a mounted
ConfigMap is updated by the kubelet swapping the ``..data`` symlink, so the resolved path's inode
and mtime are watched, not the file name); pick the profile matching the Node's labels; validate
it (an invalid one is reported by ``nodetune_tuning_profile_valid 0`` and the last good profile
stays in force); read every managed key. In ``enforce`` mode a new profile is applied at once
(keys the previous one set and this one does not name go back to their originals) and drift is
re-applied, at most once per ``reapply_interval_s``; every ``enforce`` tick also finishes a run
another process left half done (``nodetune tune`` or a pod SIGKILLed mid-apply: the journal says
``applying``), so the node is never left with a mix; ``observe`` only reports it
(``nodetune_tuning_interrupted_run``). A profile file that is gone for
``removed_ticks`` ticks in a row (not a ``..data`` swap in progress: the ConfigMap or its key was
deleted) means "untune" in ``enforce`` mode: the journaled originals are restored - only by an
agent that had a profile in force (one whose profile never matched this node's labels applied
nothing and reverts nothing: the journal may hold a CLI's or another pod's changes). ``observe``
never writes, whatever happens to its files: a removed profile is only reported. Nothing is
reverted when the agent stops.

``maintain`` can block for a minute (``systemctl``, ``modprobe``, the host lock): the daemon runs
it on a thread of its own (``agent/tuning/worker.py``). ``collect`` runs on scrape threads meanwhile,
so the state it reads is guarded by a lock, and read once per scrape (``_snapshot``).
``nodetune_tuning_last_tick_timestamp_seconds`` says when a tick last ended: a tick stuck in a
subprocess or on the lock shows as a timestamp that stops moving.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from agent.tuning.base import TuningError, TuningItem
from agent.tuning.engine import ApplyFailed, Engine
from agent.tuning.journal import JournalError
from agent.tuning.lock import LockTimeout
from agent.tuning.profile import Profile, ProfileError, default_profile, parse, read_profile_text, select
from agent.tuning.validate import build
from host.paths import HostPaths

log = logging.getLogger(__name__)
MODES = ("observe", "enforce")


class TuningUnit:
    def __init__(
        self,
        host: HostPaths,
        profile_path: Path | None,
        mode: str,
        node_labels: Callable[[], Mapping[str, str] | None] = lambda: None,
        reapply_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        removed_ticks: int = 3,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}")
        self.host = host
        self.path = profile_path
        self.mode = mode
        self.node_labels = node_labels
        self.reapply_interval_s = reapply_interval_s
        self.clock = clock
        self._identity: tuple | None = None
        self._labels: Mapping[str, str] | None = None
        self.profile: Profile | None = None
        self.items: list[TuningItem] = []
        self.valid = True
        self.in_sync: dict[tuple[str, str], bool] = {}
        self.changes: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self._last_apply = float("-inf")
        self.removed_ticks = removed_ticks
        self._missing = 0  # consecutive ticks without the profile file
        self._state = threading.Lock()  # counters and in_sync: written by maintain, read by collect
        self._apply_now = False  # a new profile: apply (and release dropped keys) at once
        self._last_error = ""  # the same failure every tick is logged once
        self._lock_wait_told = False  # "waiting for the lock" is logged once while it is held
        self.interrupted = False  # the journal held a run in progress at the last tick
        self.last_tick = 0.0  # wall-clock time the last tick ended (0: none yet)
        if self.path is None:
            try:
                self._use(default_profile())
            except ProfileError as e:  # a host without THP, say: report, run on
                self.valid = False
                log.error("tuning: built-in profile does not fit this host: %s", e)

    # --- timer --------------------------------------------------------------------------------
    def _file_identity(self) -> tuple | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)  # follows the ..data symlink: a swap changes the inode
        except OSError:
            return None
        return (os.path.realpath(self.path), st.st_ino, st.st_mtime_ns, st.st_size)

    def _count(self, table: dict[str, int], item: str, n: int = 1) -> None:
        with self._state:
            table[item] = table.get(item, 0) + n

    def _error(self, item: str, message: str) -> None:
        """Count the error under the item's name; log it, once while it repeats."""
        self._count(self.errors, item)
        if message != self._last_error:
            log.error("tuning: %s", message)
            self._last_error = message

    def _use(self, profile: Profile) -> None:
        items, warnings = build(profile, self.host)  # raises ProfileError: keep the last good one
        for w in warnings:
            log.warning("tuning: %s", w)
        with self._state:
            self.profile, self.items, self.valid = profile, items, True
        self._last_apply = float("-inf")  # a new profile applies at once; the rate limit is for drift
        self._apply_now = True
        for item in items:
            for note in item.notes():
                log.warning("tuning: %s", note)
        log.info("tuning: profile %s (%s mode): %s", profile.name, self.mode, ", ".join(profile.items()) or "empty")

    def _removed(self) -> bool:
        """The profile file has been gone long enough: revert what was applied (once)."""
        if self.path is None or self._file_identity() is not None:
            self._missing = 0
            return False
        self._missing += 1
        if self._missing < self.removed_ticks:
            return False
        if self.mode == "observe":  # observe never writes: the profile is gone, nothing is undone
            if self.profile is not None:
                log.warning("tuning: profile %s removed: observe mode, nothing on the host is changed", self.path)
            self._forget()
            return True
        if self.profile is None:
            return True  # reverted already, or no profile was ever in force here: nothing of ours to undo
        try:
            restored = Engine(self.host, [], "", on_lock_wait=self._say_waiting, unsafe=self.profile.unsafe).revert()
        except ApplyFailed as e:
            self._error(e.item, f"profile {self.path} removed, but the revert failed: {e} ({e.outcome()})")
            return True  # retried next tick: the profile is still in force
        except LockTimeout as e:
            self._error("lock", f"profile {self.path} removed, revert waits: {e}")
            return True
        except (JournalError, TuningError, OSError) as e:
            self._error("engine", f"profile {self.path} removed, but reverting failed: {e}")
            return True
        for c in restored:
            self._count(self.changes, c.item)
        log.warning("tuning: profile %s removed: %d key(s) restored to their originals", self.path, len(restored))
        self._forget()
        return True

    def _forget(self) -> None:
        with self._state:
            self.profile, self.items, self.in_sync = None, [], {}
        self._identity = None

    def _say_waiting(self) -> None:
        if not self._lock_wait_told:
            log.warning("tuning: waiting for the tuning lock on %s (another nodetune holds it)", self.host.journal_dir)
            self._lock_wait_told = True

    def _reload(self) -> None:
        labels = self.node_labels()
        identity = self._file_identity() if self.path is not None else None
        if self.path is not None and (identity != self._identity or labels != self._labels):
            self._identity, self._labels = identity, labels
            try:
                if identity is None:
                    raise ProfileError(f"{self.path}: not readable")
                chosen = select(parse(read_profile_text(Path(self.path))), labels)
                if chosen is None:
                    raise ProfileError(f"{self.path}: no profile matches this node's labels")
                self._use(chosen)
            except (ProfileError, OSError) as e:
                with self._state:
                    self.valid = False
                self._count(self.errors, "profile")
                log.error("tuning: profile rejected, keeping %s: %s", self.profile.name if self.profile else "none", e)

    def maintain(self) -> None:
        try:
            self._tick()
        finally:
            self.last_tick = time.time()

    def _tick(self) -> None:
        if self._removed():
            return
        self._reload()
        if self.profile is None:
            return
        engine = Engine(
            self.host, self.items, self.profile.name, on_lock_wait=self._say_waiting, unsafe=self.profile.unsafe
        )
        try:
            self.interrupted = engine.interrupted()
            if self.mode == "enforce" and self.interrupted:
                engine.load()  # under the lock: undoes a run cut short (all-original), or finds it done
                for message in engine.messages:
                    log.warning("tuning: %s", message)
                engine.messages.clear()
                self.interrupted = False
            if self.mode == "enforce":
                drift = engine.plan()
                now = self.clock()
                if (drift or self._apply_now) and now - self._last_apply >= self.reapply_interval_s:
                    self._last_apply = now
                    for c in engine.apply():
                        self._count(self.changes, c.item)
                        log.info("tuning: applied %s", c.describe())
                    self._apply_now = False
                    for message in engine.messages:
                        log.warning("tuning: %s", message)
            synced = engine.verify()
            with self._state:
                self.in_sync = synced
            self._last_error = ""
            self._lock_wait_told = False
        except ApplyFailed as e:
            self._error(e.item, f"{e.outcome()}: {e}")
            synced = engine.verify()
            with self._state:
                self.in_sync = synced
        except LockTimeout as e:
            self._error("lock", str(e))
        except (JournalError, TuningError, OSError) as e:
            self._error("engine", str(e))

    # --- scrape -------------------------------------------------------------------------------
    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily(
            "nodetune_tuning_profile_info", "The tuning profile in force and the mode.", labels=["profile", "mode"]
        )
        with self._state:  # one consistent snapshot: the tuning thread may be replacing any of these
            profile, is_valid = self.profile, self.valid
            synced, changed, failed = dict(self.in_sync), dict(self.changes), dict(self.errors)
            interrupted, last_tick = self.interrupted, self.last_tick
        if profile is not None:
            info.add_metric([profile.name, self.mode], 1)
        valid = GaugeMetricFamily(
            "nodetune_tuning_profile_valid", "Whether the last profile read was valid (0: the previous one stays)."
        )
        valid.add_metric([], 1 if is_valid else 0)
        in_sync = GaugeMetricFamily(
            "nodetune_tuning_in_sync", "Whether a managed key holds the profile's value.", labels=["item", "key"]
        )
        pending = GaugeMetricFamily(
            "nodetune_tuning_interrupted_run",
            "Whether the journal held a run cut short at the last tick (enforce finishes it; observe only reports).",
        )
        pending.add_metric([], 1 if interrupted else 0)
        tick = GaugeMetricFamily(
            "nodetune_tuning_last_tick_timestamp_seconds",
            "When the tuning thread last finished a tick (0: not yet); a stuck tick stops it moving.",
        )
        tick.add_metric([], last_tick)
        for (item, key), ok in sorted(synced.items()):
            in_sync.add_metric([item, key], 1 if ok else 0)
        changes = CounterMetricFamily("nodetune_tuning_changes", "Keys written by the tuning engine.", labels=["item"])
        errors = CounterMetricFamily(
            "nodetune_tuning_errors", "Rejected profiles and failed applies, by item.", labels=["item"]
        )
        for name in sorted({"sysctl", "thp", *changed}):
            changes.add_metric([name], changed.get(name, 0))
        for name in sorted({"profile", "lock", "sysctl", "thp", *failed}):
            errors.add_metric([name], failed.get(name, 0))
        return [info, valid, in_sync, changes, errors, pending, tick]
