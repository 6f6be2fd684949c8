"""The tuning unit on a thread of its own, so the agent's main loop (and with it ``/healthz``) never
waits for tuning: an apply can run ``systemctl`` (60 s timeout) or ``modprobe`` (120 s), or wait for
the host lock held by ``nodetune tune`` or a second agent pod.

The daemon registers this object as the ``tuning`` unit: ``maintain()`` (the agent's timer) only
wakes the thread and returns at once; a tick still running when the next one is due is not queued
twice. ``collect()`` is the unit's (scrapes never wait for a tick). The first tick starts when the
daemon calls ``start()``, after the HTTP server is up. A failure the unit did not expect is logged
(once while it repeats) and counted; the thread runs on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from prometheus_client.metrics_core import Metric

from agent.tuning.unit import TuningUnit

log = logging.getLogger(__name__)


class TuningThread:
    def __init__(self, unit: TuningUnit) -> None:
        self.unit = unit
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ticks = 0  # completed ticks (tests wait on it)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tuning", daemon=True)
        self._wake.set()  # the first tick at once
        self._thread.start()

    def maintain(self) -> None:
        self._wake.set()

    def collect(self) -> Iterable[Metric]:
        return self.unit.collect()

    def _loop(self) -> None:
        last = ""
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.unit.maintain()
                last = ""
            except Exception as e:  # a bug in a tick must not end tuning for the agent's lifetime
                self.unit._count(self.unit.errors, "engine")
                if f"{type(e).__name__}: {e}" != last:
                    log.exception("tuning: tick failed")
                    last = f"{type(e).__name__}: {e}"
            self.ticks += 1

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop after the tick in progress; a tick stuck in a subprocess is left to the process exit
        (the thread is a daemon) rather than holding up shutdown."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("tuning: a tick is still running at shutdown; not waiting for it")
