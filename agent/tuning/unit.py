"""The agent's tuning unit: keeps a profile checked (``observe``) or applied (``enforce``) on the
agent's timer, and exports what it found. Files: the profile (``--profile``, or the built-in
default), the host's sysctl/THP files through ``TuningHost``, the journal.

On each tick (never on a scrape): re-read the profile file when its identity changed (a mounted
ConfigMap is updated by the kubelet swapping the ``..data`` symlink, so the resolved path's inode
and mtime are watched, not the file name); pick the profile matching the Node's labels; validate
it (an invalid one is reported by ``nodetune_tuning_profile_valid 0`` and the last good profile
stays in force); read every managed key. In ``enforce`` mode, drift is re-applied, at most once
per ``reapply_interval_s``. A profile file that is gone for ``removed_ticks`` ticks in a row (not a
``..data`` swap in progress: the ConfigMap or its key was deleted) means "untune": the journaled
originals are restored. Nothing is reverted when the agent stops.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from agent.tuning.base import TuningError, TuningHost, TuningItem
from agent.tuning.engine import ApplyFailed, Engine
from agent.tuning.journal import JournalError
from agent.tuning.profile import Profile, ProfileError, default_profile, parse, select
from agent.tuning.validate import build

log = logging.getLogger(__name__)
MODES = ("observe", "enforce")


class TuningUnit:
    def __init__(
        self,
        host: TuningHost,
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
        table[item] = table.get(item, 0) + n

    def _use(self, profile: Profile) -> None:
        items, warnings = build(profile, self.host)  # raises ProfileError: keep the last good one
        for w in warnings:
            log.warning("tuning: %s", w)
        self.profile, self.items, self.valid = profile, items, True
        self._last_apply = float("-inf")  # a new profile applies at once; the rate limit is for drift
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
        if self._missing != self.removed_ticks:
            return self._missing > self.removed_ticks
        try:
            restored = Engine(self.host, [], "").revert()
        except (ApplyFailed, JournalError, TuningError, OSError) as e:
            self._count(self.errors, "engine")
            log.error("tuning: profile %s removed, but reverting failed: %s", self.path, e)
            return True
        for c in restored:
            self._count(self.changes, c.item)
        log.warning("tuning: profile %s removed: %d key(s) restored to their originals", self.path, len(restored))
        self.profile, self.items, self.in_sync, self._identity = None, [], {}, None
        return True

    def _reload(self) -> None:
        labels = self.node_labels()
        identity = self._file_identity() if self.path is not None else None
        if self.path is not None and (identity != self._identity or labels != self._labels):
            self._identity, self._labels = identity, labels
            try:
                if identity is None:
                    raise ProfileError(f"{self.path}: not readable")
                chosen = select(parse(Path(self.path).read_text()), labels)
                if chosen is None:
                    raise ProfileError(f"{self.path}: no profile matches this node's labels")
                self._use(chosen)
            except (ProfileError, OSError) as e:
                self.valid = False
                self._count(self.errors, "profile")
                log.error("tuning: profile rejected, keeping %s: %s", self.profile.name if self.profile else "none", e)

    def maintain(self) -> None:
        if self._removed():
            return
        self._reload()
        if self.profile is None:
            return
        engine = Engine(self.host, self.items, self.profile.name)
        try:
            if self.mode == "enforce":
                drift = engine.plan()
                now = self.clock()
                if drift and now - self._last_apply >= self.reapply_interval_s:
                    self._last_apply = now
                    for c in engine.apply():
                        self._count(self.changes, c.item)
                        log.info("tuning: applied %s", c.describe())
                    for message in engine.messages:
                        log.warning("tuning: %s", message)
            self.in_sync = engine.verify()
        except ApplyFailed as e:
            self._count(self.errors, str(e).split(" ", 1)[0])
            log.error("tuning: apply failed and was rolled back: %s", e)
            self.in_sync = engine.verify()
        except (JournalError, TuningError, OSError) as e:
            self._count(self.errors, "engine")
            log.error("tuning: %s", e)

    # --- scrape -------------------------------------------------------------------------------
    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily(
            "nodetune_tuning_profile_info", "The tuning profile in force and the mode.", labels=["profile", "mode"]
        )
        if self.profile is not None:
            info.add_metric([self.profile.name, self.mode], 1)
        valid = GaugeMetricFamily(
            "nodetune_tuning_profile_valid", "Whether the last profile read was valid (0: the previous one stays)."
        )
        valid.add_metric([], 1 if self.valid else 0)
        in_sync = GaugeMetricFamily(
            "nodetune_tuning_in_sync", "Whether a managed key holds the profile's value.", labels=["item", "key"]
        )
        for (item, key), ok in sorted(self.in_sync.items()):
            in_sync.add_metric([item, key], 1 if ok else 0)
        changes = CounterMetricFamily("nodetune_tuning_changes", "Keys written by the tuning engine.", labels=["item"])
        errors = CounterMetricFamily(
            "nodetune_tuning_errors", "Rejected profiles and failed applies, by item.", labels=["item"]
        )
        for name in sorted({"sysctl", "thp", *self.changes}):
            changes.add_metric([name], self.changes.get(name, 0))
        for name in sorted({"profile", "sysctl", "thp", *self.errors}):
            errors.add_metric([name], self.errors.get(name, 0))
        return [info, valid, in_sync, changes, errors]
