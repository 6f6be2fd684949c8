"""``nodetune run``: load the probes, serve metrics, keep house, stay alive until SIGTERM.

Start-up order: HTTP server first, so /healthz answers at once; probes are then loaded on their
own thread (a first-run header merge plus compile can take tens of seconds) while the main loop
beats the /healthz heartbeat. A probe that cannot load is logged once and reported as
``probe_up 0``; the agent runs on. /readyz turns 200 once every probe has been tried.

The main loop also runs the housekeeping timer: every ``maintain_interval_s`` (+-20 % jitter, so
that the nodes of a cluster do not act in step, seed 002) each loaded probe reclaims the rows of
vanished cgroups and follows label changes. Metrics are read at scrape time only, and a scrape
changes nothing. SIGTERM/SIGINT detach every probe and exit 0.

Agent-level metrics include the kernel's accounting of each probe program (its fdinfo: run
time, runs, recursion misses); with ``--bpf-stats`` the agent holds ``BPF_ENABLE_STATS`` so the
kernel keeps run times while it runs.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from agent import __version__
from agent.collectors.listen import ListenCollector
from agent.collectors.ports import PortsCollector
from agent.collectors.throttling import ThrottlingCollector
from agent.config import AgentConfig
from agent.exporter import Exporter, MetricsServer
from agent.kube import KubeWatch, api_client
from agent.netns import NetnsIndex
from agent.paths import HostPaths
from agent.tuning.base import TuningHost
from agent.tuning.unit import TuningUnit
from agent.workloads import Workloads
from probes import PROBES, bpfsys
from probes.base import CPU_V1, KernelFacts, Probe, ProbeUnavailable

log = logging.getLogger(__name__)


@dataclass
class ProbeState:
    name: str
    probe: Probe | None = None  # set while loaded
    attach: str = ""
    reason: str = ""  # why it is not up
    skipped: dict[str, str] = field(default_factory=dict)  # strategy -> why it was passed over


class FailedUnit:
    """Stands in for a collector that could not start: every scrape reports it failed, and why."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def collect(self) -> list[Metric]:
        raise self.error


def make_probe(name: str, config: AgentConfig, kernel: KernelFacts, workloads: Workloads) -> Probe:
    strategy = config.probe_strategies.get(name)
    return PROBES[name](
        kernel,
        workloads,
        only_strategies=[strategy] if strategy else None,
        series_grace_s=config.workload_series_grace_s,
        **config.probe_settings.get(name, {}),
    )


class Agent:
    """The daemon's state: probes, identity service, exporter, server."""

    def __init__(self, config: AgentConfig, extra_probes: Iterable[Probe] = (), collectors: bool = True) -> None:
        """``collectors=False`` (``nodetune probes``): probes only, no collectors and no API watch."""
        self.config = config
        self.paths = HostPaths(config.host_root)
        self.hierarchy, hierarchy_root = self.paths.workload_hierarchy(config.cgroup_hierarchy)
        self.hierarchy_root = hierarchy_root
        self.kernel = KernelFacts(
            host_root=self.paths.root,
            sys_root=self.paths.sys,
            proc_root=self.paths.proc,
            cache_dir=config.cache_dir,
            workload_hierarchy=self.hierarchy,
            cgroup2_root=self.paths.cgroup_v2(),
        )
        self.stop_event = threading.Event()
        self.kube = self._kube_watch() if collectors else None
        self.workloads = Workloads(hierarchy_root, pod_names=self.kube.index if self.kube else None)
        self.exporter = Exporter()
        self.exporter.register("agent", self)  # agent-level metrics are isolated like any unit
        self.probes: dict[str, ProbeState] = {}
        self._probes_lock = threading.Lock()
        self.collectors: dict[str, object] = {}
        self.netns: NetnsIndex | None = None
        self._stats_fd = -1  # BPF_ENABLE_STATS, held while running with --bpf-stats
        if collectors:
            self._start_collectors()
        self.candidates: list[Probe] = [make_probe(n, config, self.kernel, self.workloads) for n in config.probes]
        self.candidates.extend(extra_probes)
        self._heartbeat = time.monotonic()
        self._ready = False
        self._loader: threading.Thread | None = None
        self.server: MetricsServer | None = None
        if hierarchy_root is None:
            log.warning(
                "no cgroup hierarchy for --cgroup-hierarchy %s: workloads stay unlabelled", config.cgroup_hierarchy
            )
        elif self.hierarchy == CPU_V1:
            log.info("charging workloads to the v1 cpu hierarchy at %s", hierarchy_root)

    # --- health ---------------------------------------------------------------------------
    def healthy(self) -> bool:
        return time.monotonic() - self._heartbeat < self.config.health_timeout_s

    def ready(self) -> bool:
        return self._ready

    def collect(self) -> list[Metric]:
        """Agent-level metrics (the ``agent`` unit)."""
        with self._probes_lock:
            states = list(self.probes.values())
        build = GaugeMetricFamily("nodetune_build_info", "nodetune version running.", labels=["version"])
        build.add_metric([__version__], 1)
        up = GaugeMetricFamily("nodetune_probe_up", "Whether a BPF probe is loaded and attached.", labels=["probe"])
        info = GaugeMetricFamily(
            "nodetune_probe_info", "Attach strategy of each loaded probe.", labels=["probe", "attach"]
        )
        for state in states:
            up.add_metric([state.name], 1 if state.probe else 0)
            if state.probe:
                info.add_metric([state.name, state.attach], 1)
        return [build, up, info, *self._program_costs(states)]

    def _program_costs(self, states: list[ProbeState]) -> list[Metric]:
        """What the kernel counts for each loaded probe program (its fdinfo: a read per program)."""
        labels = ["probe", "program"]
        enabled = GaugeMetricFamily(
            "nodetune_probe_bpf_stats_enabled",
            "1 while the kernel times BPF program runs (--bpf-stats or the kernel.bpf_stats_enabled sysctl).",
        )
        enabled.add_metric([], 1 if self._stats_fd >= 0 or self._stats_sysctl() else 0)
        run_time = CounterMetricFamily(
            "nodetune_probe_bpf_run_seconds",
            "Time the kernel spent running each probe program, while BPF run-time stats were on.",
            labels=labels,
        )
        runs = CounterMetricFamily(
            "nodetune_probe_bpf_runs", "Runs of each probe program, while BPF run-time stats were on.", labels=labels
        )
        misses = CounterMetricFamily(
            "nodetune_probe_bpf_recursion_misses",
            "Runs of each probe program the kernel skipped because it was already running on that CPU.",
            labels=labels,
        )
        for state in states:
            probe = state.probe
            if probe is None:
                continue
            for program, fd in sorted(probe.program_fds().items()):
                stats = bpfsys.prog_stats(fd)
                if stats is None:  # the probe closed meanwhile
                    continue
                run_time.add_metric([state.name, program], stats.run_time_ns / 1e9)
                runs.add_metric([state.name, program], stats.run_cnt)
                misses.add_metric([state.name, program], stats.recursion_misses)
        return [enabled, run_time, runs, misses]

    def _stats_sysctl(self) -> bool:
        try:
            return (self.paths.proc / "sys/kernel/bpf_stats_enabled").read_text().strip() == "1"
        except OSError:
            return False

    # --- lifecycle ------------------------------------------------------------------------
    def start_server(self) -> None:
        self.server = MetricsServer(
            (self.config.listen_host, self.config.listen_port),
            self.exporter,
            healthy=self.healthy,
            ready=self.ready,
            max_concurrent_scrapes=self.config.max_concurrent_scrapes,
        )
        self.server.start()
        host, port = self.server.server_address[:2]
        log.info("serving metrics on %s:%s", host, port)

    def load_probes(self) -> None:
        log.info("kernel %s; %s", self.kernel.release, self.kernel.describe_headers())
        started = time.monotonic()
        for probe in self.candidates:
            state = ProbeState(probe.name)
            try:
                probe.load()
            except ProbeUnavailable as e:
                state.reason = e.reason
                log.warning("probe %s unavailable: %s", probe.name, e.reason)
            except Exception as e:  # a bug in a probe must not stop the agent
                state.reason = f"{type(e).__name__}: {e}"
                log.exception("probe %s failed to load", probe.name)
            else:
                state.probe, state.attach = probe, probe.attach or ""
                self.exporter.register(probe.name, probe)
            state.skipped = dict(probe.skipped)
            with self._probes_lock:
                self.probes[probe.name] = state
        self._ready = True
        log.info("probes loaded in %.2fs: %s", time.monotonic() - started, self.probe_summary())

    def probe_summary(self) -> str:
        return ", ".join(f"{s.name}={s.attach or 'down'}" for s in self.probes.values()) or "none"

    def _kube_watch(self) -> KubeWatch | None:
        """The pod/node watch, or None (one log line says why) on a host without an API."""
        try:
            api = api_client(self.config.kubeconfig)
        except Exception as e:  # a broken kubeconfig or service account: names stay on the fallback
            log.warning("no Kubernetes API (%s: %s): workloads keep cgroup labels", type(e).__name__, e)
            return None
        if api is None:
            log.info("no Kubernetes API (no --kubeconfig, not in a pod): workloads keep cgroup labels")
            return None
        if not self.config.node_name:
            log.warning("no node name (--node-name or NODE_NAME): pods are not watched")
            return None
        return KubeWatch(api, self.config.node_name, self.stop_event)

    def _start_collectors(self) -> None:
        """Each collector is a unit; one that cannot start is reported as failing, not fatal."""
        grace = self.config.workload_series_grace_s

        def network_namespaces() -> NetnsIndex:
            """One discovery for both network collectors, refreshed by the daemon's timer."""
            if self.netns is None:
                self.netns = NetnsIndex(self.paths, self.workloads, self.hierarchy_root)
            return self.netns

        factories = {
            "throttling": lambda: ThrottlingCollector(self.paths, self.workloads, grace),
            "listen": lambda: ListenCollector(network_namespaces(), grace),
            "ports": lambda: PortsCollector(network_namespaces(), self.config.ports_top_destinations),
        }
        factories = {name: f for name, f in factories.items() if name in self.config.collectors}
        if self.kube is not None:
            factories["kube"] = lambda: self.kube
        factories["tuning"] = self._tuning_unit
        for name, factory in factories.items():
            try:
                unit = factory()
            except Exception as e:
                log.warning("collector %s unavailable: %s: %s", name, type(e).__name__, e)
                unit = FailedUnit(e)
            self.collectors[name] = unit
            self.exporter.register(name, unit)

    def _tuning_unit(self) -> TuningUnit:
        kube = self.kube

        def node_labels() -> dict[str, str] | None:
            # Labels only once the Node has been read: until then only unconditional profiles match.
            return dict(kube.node_labels) if kube is not None and kube.node_labels_version else None

        host = TuningHost(self.config.host_root)
        unit = TuningUnit(host, self.config.profile, self.config.mode, node_labels)
        unit.maintain()  # the first report (or apply, in enforce mode) without waiting for the timer
        return unit

    def start_loading(self) -> None:
        """Load the probes on a thread of their own (and start the API watch); the main loop keeps
        beating meanwhile."""
        if self.config.bpf_stats:
            try:
                self._stats_fd = bpfsys.enable_run_time_stats()
                log.info("BPF run-time stats on while the agent runs (--bpf-stats)")
            except OSError as e:  # kernels before 5.8 have no BPF_ENABLE_STATS
                log.warning("--bpf-stats: the kernel refused BPF_ENABLE_STATS (%s); run time is not measured", e)
        if self.kube is not None:
            self.kube.start()
        self._loader = threading.Thread(target=self.load_probes, name="probe-loader", daemon=True)
        self._loader.start()

    def maintain(self) -> None:
        """Housekeeping of every loaded probe (timer; never on a scrape)."""
        with self._probes_lock:
            loaded = [s.probe for s in self.probes.values() if s.probe is not None]
        if self.netns is not None:
            try:
                self.netns.refresh()  # before the network collectors' ticks
            except Exception:
                log.exception("network namespaces: refresh failed")
        units = [(p.name, p) for p in loaded] + [(n, c) for n, c in self.collectors.items() if hasattr(c, "maintain")]
        for name, unit in units:
            try:
                unit.maintain()  # type: ignore[attr-defined]
            except Exception:  # a unit's bug must not stop the timer or the other units
                log.exception("%s: housekeeping failed", name)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self._loader is not None:
            self._loader.join()  # never detach while a probe is half loaded
        if self.kube is not None:
            self.stop_event.set()
            self.kube.join()
        for collector in self.collectors.values():
            if hasattr(collector, "close"):
                collector.close()
        if self.netns is not None:
            self.netns.close()
            self.netns = None
        for state in self.probes.values():
            if state.probe is not None:
                self.exporter.unregister(state.name)
                state.probe.close()
                state.probe = None
        log.info("probes detached")
        if self._stats_fd >= 0:
            os.close(self._stats_fd)  # the kernel stops timing programs unless someone else asked
            self._stats_fd = -1

    def run_forever(self, tick_s: float = 1.0) -> None:
        interval = self.config.maintain_interval_s
        next_maintain = time.monotonic() + interval * random.uniform(0.8, 1.2)
        while not self.stop_event.wait(min(tick_s, interval)):
            now = self._heartbeat = time.monotonic()
            if now >= next_maintain and self._ready:
                self.maintain()
                next_maintain = time.monotonic() + interval * random.uniform(0.8, 1.2)


def run(config: AgentConfig) -> int:
    agent = Agent(config)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        agent.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.start_server()
        agent.start_loading()
        agent.run_forever()
    finally:
        agent.close()
    return 0
