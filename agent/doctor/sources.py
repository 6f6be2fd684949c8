"""Where the doctor's readings come from: the agent's own units run in this process (``LiveSource``),
or a running agent's ``/metrics`` (``RemoteSource``). Both give ``Reading``s of the same metrics, so
one analysis serves both, and both say which units could not run here and why.

Live: an ``Agent`` (``agent/daemon.py``) with its collectors and probes, built and loaded exactly
as ``nodetune run`` does (same flags), read through its exporter's ``scrape()`` - the same code a
Prometheus scrape runs - without the HTTP server. The tuning unit runs in ``observe`` mode whatever
the flags (the doctor never writes to the host); its one tick runs here, before the first reading (the
daemon runs it on its own thread, ``agent/tuning/worker.py``, which the doctor never starts). Every
BPF map starts empty at load, so a label set that first appears during the window counts from 0
(``Reading.new_from_zero``). Lock callers come from the lockstat probe's own totals, every caller
(``caller_totals()``), not the top-N export, whose choice was made before the window.
Remote: an HTTP GET of the URL, parsed with prometheus_client's parser. A label set new in the
window is left out there, as Prometheus' ``increase()`` has no earlier sample for it either.
"""

from __future__ import annotations

import gzip
import logging
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from agent.config import AgentConfig
from agent.doctor.reading import Labels, Reading
from agent.doctor.tuning import TuningFacts, from_metrics, from_unit, host_facts
from agent.tuning.unit import TuningUnit
from host.paths import HostPaths

log = logging.getLogger(__name__)

PROBE_UNITS = ("runqlat", "lockstat", "connect")
COLLECTOR_UNITS = ("throttling", "listen", "ports", "tuning")
KUBE_SYNC_S = 10.0  # how long a live run waits for the first pod list (then: cgroup names)


@contextmanager
def quiet_stderr(keep: bool) -> Iterator[None]:
    """File descriptor 2 into a temporary file while the block runs, given back afterwards only when
    ``keep``. BCC's C code writes compiler and verifier output straight to fd 2 ("bpf: Failed to load
    program: ...") while a probe tries its attach strategies; the doctor says which probe could not
    run, and why, in its report, so at the default log level that text is not the user's to read.
    ``--log-level info`` (or debug) shows it, and the agent's log lines of the same moment, in order."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no fd 2 (a test's captured stderr): nothing to quiet
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if keep:
                sink.seek(0)
                sys.stderr.write(sink.read().decode(errors="replace"))
                sys.stderr.flush()


class SourceError(Exception):
    """The source could not be read at all (exit 3)."""


def _failed_units(reading: Reading) -> dict[str, str]:
    """Units the reading itself reports as failed or down."""
    out = {}
    for labels, ok in reading.get("nodetune_scrape_collector_success").items():
        if ok != 1:
            out[dict(labels).get("collector", "")] = "failed while the doctor read it (the agent's log says why)"
    for labels, up in reading.get("nodetune_probe_up").items():
        if up != 1:
            out[dict(labels).get("probe", "")] = "not loaded in the agent (`nodetune probes` says why)"
    return out


CALLER_FAMILIES = ("nodetune_lock_contentions_total", "nodetune_lock_contention_wait_seconds_total")


class LiveSource:
    def __init__(self, config: AgentConfig) -> None:
        from agent.daemon import Agent

        self.config = replace(config, mode="observe")
        try:
            self.agent = Agent(self.config)
        except Exception as e:  # the host has no cgroups, no /proc ...: nothing to diagnose with
            raise SourceError(f"cannot start the agent's units here: {type(e).__name__}: {e}") from e
        self.name = "live"
        self._read = False

    def _tuning_unit(self) -> TuningUnit | None:
        unit = self.agent.collectors.get("tuning")
        unit = getattr(unit, "unit", unit)  # the daemon registers a TuningThread around the unit
        return unit if isinstance(unit, TuningUnit) else None

    def start(self) -> None:
        """Load the probes (a first run compiles them: seconds) and take stock of the namespaces."""
        agent = self.agent
        if agent.kube is not None:
            agent.kube.start()
        with quiet_stderr(keep=logging.getLogger().isEnabledFor(logging.INFO)):
            agent.load_probes()
        if agent.kube is not None:  # names before the first reading, or a label set changes mid-window
            deadline = time.monotonic() + KUBE_SYNC_S
            while agent.kube.pods.stats.synced_at is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if agent.kube.pods.stats.synced_at is None:
                log.warning("doctor: no pod list from the API in %.0f s: workloads keep cgroup names", KUBE_SYNC_S)
        agent.maintain()  # the namespace index, the collectors' registers
        tuning = self._tuning_unit()
        if tuning is not None:  # observe mode: reads the profile and the host, writes nothing
            tuning.maintain()

    def read(self) -> Reading:
        if self._read:  # the agent's timer, once at the end of the window: namespaces and cgroups
            self.agent.maintain()  # that came within it are read too (their counters start at 0)
        self._read = True
        reading = Reading.from_families(self.agent.exporter.scrape(), time.monotonic(), new_from_zero=True)
        callers = self._lock_callers()
        if callers is not None:
            reading.samples.update(callers)
        return reading

    def _lock_callers(self) -> dict[str, dict[Labels, float]] | None:
        """Every kernel caller's lifetime contentions and waits from the lockstat probe, in the
        exported families' shape (waits without a caller under caller="other")."""
        state = self.agent.probes.get("lockstat")
        probe = state.probe if state is not None else None
        if probe is None:
            return None
        from probes.lockstat import OTHER

        with probe._lock:  # as a scrape: the probe may not close meanwhile
            if probe._bpf is None:
                return None
            callers, unattributed = probe.caller_totals()
        counts: dict[Labels, float] = {}
        waits: dict[Labels, float] = {}
        rows = [((t, c), v) for (t, c), v in callers.items()] + [((t, OTHER), v) for t, v in unattributed.items()]
        for (lock_type, caller), (n, ns) in rows:
            key = (("caller", caller), ("lock_type", lock_type))
            counts[key] = counts.get(key, 0.0) + n
            waits[key] = waits.get(key, 0.0) + ns / 1e9
        return dict(zip(CALLER_FAMILIES, (counts, waits), strict=True))

    def unavailable(self, reading: Reading) -> dict[str, str]:
        out = _failed_units(reading)
        for probe in PROBE_UNITS:
            state = self.agent.probes.get(probe)
            if probe not in self.config.probes:
                out[probe] = "left out (--probes)"
            elif state is not None and state.probe is None:
                out[probe] = f"not loadable here: {state.reason}"
        for name in COLLECTOR_UNITS:
            unit = self.agent.collectors.get(name)
            if unit is None:
                out[name] = "left out (--collectors)"
            elif hasattr(unit, "error"):  # the daemon's FailedUnit
                out[name] = f"could not start: {type(unit.error).__name__}: {unit.error}"
        return out

    def tuning(self, reading: Reading) -> TuningFacts | None:
        unit = self._tuning_unit()
        if unit is not None:
            return from_unit(unit, judged=self.config.profile is not None)
        return host_facts(self.agent.paths, TuningFacts())  # THP and irqbalance still

    def close(self) -> None:
        """Detach everything, also a probe whose ``load()`` a Ctrl-C cut short (it is in no
        ``ProbeState`` yet; ``Probe.close()`` is safe on a probe that never loaded)."""
        try:
            self.agent.close()
        finally:
            for probe in self.agent.candidates:
                probe.close()


class RemoteSource:
    def __init__(self, url: str, host_root: str = "/", timeout_s: float = 10.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise SourceError(f"--from {url!r}: expected an http:// or https:// URL of /metrics")
        self.url = url
        self.host = HostPaths(root=Path(host_root))
        self.timeout_s = timeout_s
        self.name = url

    def start(self) -> None:
        pass

    def read(self) -> Reading:
        request = urllib.request.Request(self.url, headers={"Accept-Encoding": "gzip"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as r:
                body = r.read()
                if r.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise SourceError(f"--from {self.url}: {e}") from e
        try:
            reading = Reading.from_text(body.decode(), time.monotonic())
        except (ValueError, UnicodeDecodeError) as e:
            raise SourceError(f"--from {self.url}: not the Prometheus text format: {e}") from e
        if not reading.get("nodetune_build_info"):
            raise SourceError(f"--from {self.url}: no nodetune_build_info: not a nodetune agent's /metrics")
        return reading

    def unavailable(self, reading: Reading) -> dict[str, str]:
        out = _failed_units(reading)
        seen = {dict(lb).get("collector", "") for lb in reading.get("nodetune_scrape_collector_success")}
        for unit in (*PROBE_UNITS, *COLLECTOR_UNITS):
            if unit not in seen and unit not in out:
                out[unit] = "not run by the agent at " + self.url
        return out

    def tuning(self, reading: Reading) -> TuningFacts | None:
        return from_metrics(reading, self.host)

    def close(self) -> None:
        pass
